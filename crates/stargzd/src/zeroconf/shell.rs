//! The programs a `sh -c SCRIPT` runs: a small, bounded reading of POSIX shell syntax
//! (words, quotes, operators, redirections, assignments, keywords) that yields the
//! command words of each simple command, so zero-config prefetch can fetch the
//! programs of an image whose `Cmd` is a shell script as it fetches a plain program.
//!
//! It does not expand anything: a command word with `$`, a glob or a substitution is
//! dropped, as is everything inside `$(...)` and backquotes. Getting a script wrong
//! costs only a useless or a missing prefetch.

/// Longest script read.
pub const MAX_SCRIPT: usize = 16 << 10;
/// Most commands taken from one script.
pub const MAX_COMMANDS: usize = 32;
/// Most words kept of one command.
const MAX_WORDS: usize = 64;

/// Shell builtins (dash's and bash's common ones): never a file to fetch.
const BUILTINS: &[&str] = &[
    ".", ":", "[", "alias", "bg", "break", "cd", "continue", "echo", "eval", "exit", "export",
    "false", "fg", "getopts", "hash", "jobs", "kill", "local", "printf", "pwd", "read", "readonly",
    "return", "set", "shift", "source", "test", "times", "trap", "true", "type", "ulimit", "umask",
    "unalias", "unset", "wait",
];

/// Reserved words after which the next word starts a command.
const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}",
];

/// Words that run the rest of the command: the program is the next word that is not
/// an option (or an assignment, for `env`).
const WRAPPERS: &[&str] = &["exec", "command", "env", "nohup", "nice", "time", "builtin"];

/// The shells whose `-c` argument is a script.
pub fn is_shell(name: &str) -> bool {
    matches!(
        name,
        "sh" | "bash" | "dash" | "ash" | "ksh" | "mksh" | "zsh"
    )
}

/// The script of a shell's argument list (`-c SCRIPT`, also `-ec SCRIPT`, `-lc`).
pub fn script_arg(args: &[String]) -> Option<&str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" || !a.starts_with('-') {
            return None;
        }
        if a.len() > 1 && a[1..].chars().all(|c| c.is_ascii_alphabetic()) && a.contains('c') {
            return it.next().map(String::as_str);
        }
    }
    None
}

/// The script `su` / `runuser` runs with `-c`/`--command` (they hand it to a shell).
pub fn su_command(args: &[String]) -> Option<&str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-c" || a == "--command" {
            return it.next().map(String::as_str);
        }
        if let Some(c) = a.strip_prefix("--command=") {
            return Some(c);
        }
    }
    None
}

/// The argument list of every simple command of `script` that runs a program, builtins,
/// keywords, assignments and redirections left out, wrappers (`exec`, `env`, ...)
/// looked through. At most [`MAX_COMMANDS`].
pub fn commands(script: &str) -> Vec<Vec<String>> {
    let script = match script.char_indices().nth(MAX_SCRIPT) {
        Some((i, _)) => &script[..i],
        None => script,
    };
    let mut out = Vec::new();
    for words in simple_commands(script) {
        if out.len() >= MAX_COMMANDS {
            break;
        }
        if let Some(argv) = program_of(words) {
            out.push(argv);
        }
    }
    out
}

/// One token of the script.
#[derive(Debug, PartialEq)]
enum Token {
    /// A word after quote removal; `plain` when nothing in it needs expansion.
    Word { text: String, plain: bool },
    /// `;`, `&`, `&&`, `||`, `|`, `(`, `)` or a newline: a command ends.
    Separator,
    /// A redirection operator: the next word is its target, not an argument.
    Redirect,
}

fn simple_commands(script: &str) -> Vec<Vec<(String, bool)>> {
    let mut commands = Vec::new();
    let mut current: Vec<(String, bool)> = Vec::new();
    let mut skip_target = false;
    for token in tokens(script) {
        match token {
            Token::Separator => {
                if !current.is_empty() {
                    commands.push(std::mem::take(&mut current));
                }
                skip_target = false;
            }
            Token::Redirect => skip_target = true,
            Token::Word { text, plain } => {
                if std::mem::take(&mut skip_target) {
                    continue;
                }
                if current.is_empty() && KEYWORDS.contains(&text.as_str()) {
                    continue;
                }
                if current.len() < MAX_WORDS {
                    current.push((text, plain));
                }
            }
        }
    }
    if !current.is_empty() {
        commands.push(current);
    }
    commands
}

/// The program and its arguments, or `None` for a builtin or a word that needs
/// expanding.
fn program_of(words: Vec<(String, bool)>) -> Option<Vec<String>> {
    let mut words = words.into_iter().peekable();
    // Leading assignments set the environment of the command.
    while words.peek().is_some_and(|(w, _)| is_assignment(w)) {
        words.next();
    }
    loop {
        let (word, plain) = words.next()?;
        if !plain || word.is_empty() {
            return None;
        }
        if WRAPPERS.contains(&word.as_str()) {
            let wrapper = word;
            // Options of the wrapper (`nice -n 5` takes a value), and for env the
            // assignments.
            while let Some((w, _)) = words.peek() {
                if w == "--" {
                    words.next();
                    break;
                }
                if w.starts_with('-') {
                    let takes_value = (wrapper == "nice" && w == "-n")
                        || (wrapper == "exec" && w == "-a")
                        || (wrapper == "env" && (w == "-u" || w == "-C"));
                    words.next();
                    if takes_value {
                        words.next();
                    }
                } else if wrapper == "env" && is_assignment(w) {
                    words.next();
                } else {
                    break;
                }
            }
            continue;
        }
        if BUILTINS.contains(&word.as_str()) {
            return None;
        }
        let mut argv = vec![word];
        argv.extend(words.filter(|(_, plain)| *plain).map(|(w, _)| w));
        return Some(argv);
    }
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

fn tokens(script: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = script.chars().peekable();
    let mut word = String::new();
    let mut in_word = false;
    let mut plain = true;
    macro_rules! end_word {
        () => {
            if in_word {
                out.push(Token::Word {
                    text: std::mem::take(&mut word),
                    plain,
                });
                in_word = false;
                plain = true;
            }
        };
    }
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => end_word!(),
            '\n' | ';' | '(' | ')' => {
                end_word!();
                out.push(Token::Separator);
            }
            '&' | '|' => {
                // `>&` and `|&` belong to a redirection or a pipe alike: a separator
                // either way, except `2>&1` whose `&` follows a redirect.
                end_word!();
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                if matches!(out.last(), Some(Token::Redirect)) {
                    continue;
                }
                out.push(Token::Separator);
            }
            '<' | '>' => {
                // A file-descriptor number before the operator is not an argument.
                if in_word && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                    plain = true;
                }
                end_word!();
                while chars
                    .peek()
                    .is_some_and(|&n| n == '<' || n == '>' || n == '|')
                {
                    chars.next();
                }
                if chars.peek() == Some(&'&') {
                    // `>&2`: the target is a descriptor, dropped as a word.
                    chars.next();
                }
                out.push(Token::Redirect);
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push(Token::Separator);
                        break;
                    }
                }
            }
            '\'' => {
                in_word = true;
                for n in chars.by_ref() {
                    if n == '\'' {
                        break;
                    }
                    word.push(n);
                }
            }
            '"' => {
                in_word = true;
                while let Some(n) = chars.next() {
                    match n {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                if !matches!(e, '"' | '\\' | '$' | '`' | '\n') {
                                    word.push('\\');
                                }
                                if e != '\n' {
                                    word.push(e);
                                }
                            }
                        }
                        '$' | '`' => {
                            plain = false;
                            word.push(n);
                        }
                        _ => word.push(n),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') | None => {}
                    Some(e) => word.push(e),
                }
            }
            '`' => {
                // Command substitution: its text is not this command's words.
                in_word = true;
                plain = false;
                for n in chars.by_ref() {
                    if n == '`' {
                        break;
                    }
                }
            }
            '$' => {
                in_word = true;
                plain = false;
                if chars.peek() == Some(&'(') {
                    let mut depth = 0u32;
                    for n in chars.by_ref() {
                        match n {
                            '(' => depth += 1,
                            ')' => {
                                depth = depth.saturating_sub(1);
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                } else {
                    word.push('$');
                }
            }
            '*' | '?' | '[' if in_word || c != '[' => {
                in_word = true;
                plain = false;
                word.push(c);
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(Token::Word { text: word, plain });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progs(script: &str) -> Vec<String> {
        commands(script).into_iter().map(|c| c[0].clone()).collect()
    }

    #[test]
    fn lists_and_pipelines() {
        assert_eq!(
            progs("a && b || c; d | e & f\ng"),
            ["a", "b", "c", "d", "e", "f", "g"]
        );
        assert_eq!(progs("(a; b)"), ["a", "b"]);
    }

    #[test]
    fn builtins_keywords_assignments_and_wrappers() {
        assert_eq!(
            progs("mkdir -p /tmp/h && cd /tmp/h && printf 'x' > h.go && HOME=/tmp GOCACHE=/tmp/c go run h.go"),
            ["mkdir", "go"]
        );
        assert_eq!(
            progs("if test -f x; then exec nice -n 5 srv --a; fi"),
            ["srv"]
        );
        assert_eq!(progs("env -u X A=1 B=2 prog"), ["prog"]);
        assert_eq!(progs("exec -a name prog"), ["prog"]);
        assert_eq!(progs("exec 3>&1"), Vec::<String>::new());
        let c = commands("exec /usr/lib/pg/bin/postgres -D /var/lib -c ssl=off");
        assert_eq!(
            c,
            vec![vec![
                "/usr/lib/pg/bin/postgres",
                "-D",
                "/var/lib",
                "-c",
                "ssl=off"
            ]]
        );
    }

    #[test]
    fn quotes_and_redirections() {
        let c = commands(
            r#"printf '#include <stdio.h>\n' > /tmp/h.c && gcc -o "/tmp/h" /tmp/h.c 2>&1 && /tmp/h"#,
        );
        assert_eq!(
            c,
            vec![
                vec![
                    "gcc".to_string(),
                    "-o".into(),
                    "/tmp/h".into(),
                    "/tmp/h.c".into()
                ],
                vec!["/tmp/h".to_string()],
            ]
        );
        assert_eq!(progs("a <in >out 2>>err b"), ["a"]);
        assert_eq!(commands("a <in >out 2>>err b"), vec![vec!["a", "b"]]);
        assert_eq!(progs("'my prog' x"), ["my prog"]);
        assert_eq!(progs("# nothing\nls # trailing"), ["ls"]);
    }

    #[test]
    fn what_needs_expanding_is_left_out() {
        assert_eq!(
            progs("$CMD a; `which x` b; $(find) c; ls $HOME; x* y"),
            ["ls"]
        );
        assert_eq!(commands("ls $HOME /"), vec![vec!["ls", "/"]]);
        assert_eq!(progs("\"$X\" y"), Vec::<String>::new());
    }

    #[test]
    fn shell_and_su_arguments() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(script_arg(&s(&["-c", "ls"])), Some("ls"));
        assert_eq!(script_arg(&s(&["-ec", "ls"])), Some("ls"));
        assert_eq!(script_arg(&s(&["script.sh", "-c", "ls"])), None);
        assert_eq!(script_arg(&s(&["-e"])), None);
        assert_eq!(
            su_command(&s(&["postgres", "-s", "/bin/sh", "-c", "exec x"])),
            Some("exec x")
        );
        assert_eq!(su_command(&s(&["--command=y", "u"])), Some("y"));
        assert!(is_shell("bash") && !is_shell("bashful"));
    }

    #[test]
    fn bounded() {
        let long = "a;".repeat(100_000);
        assert_eq!(commands(&long).len(), MAX_COMMANDS);
        let words = format!("x {}", "y ".repeat(1000));
        assert_eq!(commands(&words)[0].len(), MAX_WORDS);
        // Unterminated quotes and substitutions end at the end of the script.
        assert_eq!(progs("a 'b"), ["a"]);
        assert_eq!(progs("a; $(b"), ["a"]);
    }
}
