//! Working out, round by round, which files of an image its first process opens: the
//! program its config names, a script's interpreter, an ELF's loader and libraries
//! (transitively), the runtime files of [`super::runtime`], a C compile's headers
//! ([`super::cinclude`]).
//!
//! A round's files are fetched before they are parsed; [`Plan::advance`] looks at
//! what arrived (through [`Files`]) and adds the next round's. Everything is bounded:
//! [`MAX_LIBS`] libraries, [`MAX_DEPTH`] levels of `DT_NEEDED`, [`MAX_SCRIPTS`]
//! interpreters of interpreters, [`MAX_FILES`] files in all.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use estargz::NodeKind;

use super::cinclude::{self, Include};
use super::elf::{self, ElfDeps};
use super::goimport;
use super::image_config::Process;
use super::ldcache::{self, LdCache};
use super::named;
use super::runtime;
use super::shell;
use super::view::{Found, MergedView, Resolved};

pub const MAX_LIBS: usize = 256;
pub const MAX_DEPTH: u32 = 8;
pub const MAX_SCRIPTS: u32 = 4;
pub const MAX_FILES: usize = 4096;
/// Most commands of shell scripts (`sh -c`, `su -c`, nested) resolved in all.
pub const MAX_COMMANDS: usize = 64;
/// Most sources, and script-written includes or imports, taken as a compile's or a
/// Go build's starting points (each kind on its own).
const MAX_C_SOURCES: usize = 32;
/// Bytes of a file looked at for `#!`.
const SHEBANG_BYTES: u32 = 256;

/// Bytes of the image's files that have been fetched.
pub trait Files {
    /// Bytes `0..len` of a file (less at its end), if they are local.
    fn head(&self, f: Found, len: u32) -> Option<Vec<u8>>;
    /// The whole file, if it is local and at most `max` bytes.
    fn whole(&self, f: Found, max: u64) -> Option<Vec<u8>>;
    /// The ELF facts of a local file.
    fn elf(&self, f: Found) -> Option<ElfDeps>;
    /// The ranges of a large ELF file worth fetching (see [`elf::load_ranges`]), from
    /// its local head; `None` to fetch it whole.
    fn load_ranges(&self, f: Found) -> Option<Vec<Range<u64>>>;
    /// Whether `ranges` of a file (`None`: all of it) are local.
    fn ready(&self, f: Found, ranges: Option<&[Range<u64>]>) -> bool;
}

/// What a wanted file is parsed as once it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// Only fetched.
    Data,
    /// `/etc/ld.so.cache`.
    LdCache,
    /// A program (script or ELF) reached through `scripts` interpreters.
    Program { scripts: u32 },
    /// A shared object `depth` levels of `DT_NEEDED` below the program.
    Library { depth: u32 },
    /// A C or C++ source or header `depth` includes below what a compile was given.
    Header { depth: u32 },
    /// A file a command's arguments name, looked at for the absolute paths it names
    /// in turn (a server's configuration naming its other files).
    Config,
    /// A Go source file whose imports a build follows.
    GoSource,
}

/// The files wanted so far and what is left to parse.
pub struct Plan<'v> {
    view: &'v MergedView<'v>,
    path: Vec<String>,
    ld_library_path: Vec<String>,
    cwd: String,
    /// Every wanted file in the order found.
    wanted: Vec<Found>,
    seen: HashSet<Found>,
    /// Arrived (or given up on) and not yet parsed.
    pending: Vec<(Found, String, Role)>,
    /// Added since the last [`Plan::take_round`].
    fresh: Vec<(Found, String, Role)>,
    ldcache: Option<LdCache>,
    sonames: HashSet<String>,
    python_done: bool,
    gcc_done: bool,
    /// Files to fetch only in part: byte ranges, sorted.
    ranges: HashMap<Found, Vec<Range<u64>>>,
    /// Large ELF files whose head only is being fetched, to read their program headers.
    heads: HashSet<Found>,
    /// Commands of shell scripts looked at so far (bounded by [`MAX_COMMANDS`]).
    commands: usize,
    /// Lookups of a soname done already (so a library every other one needs is
    /// resolved once).
    lib_lookups: HashMap<String, Option<Resolved>>,
    /// Includes of C source that shell scripts write themselves.
    script_includes: Vec<Include>,
    /// Sources (as given, maybe relative) that compiler drivers are given.
    c_sources: Vec<String>,
    /// Where `#include <...>` is searched, once a C compiler driver was found.
    include_dirs: Vec<String>,
    /// Headers and sources wanted so far (bounded by [`cinclude::MAX_HEADERS`]).
    headers: usize,
    /// Paths that commands' arguments name, taken so far.
    named: usize,
    /// Imports of Go source that shell scripts write themselves.
    script_go_imports: Vec<String>,
    /// Go sources (as given) that `go` commands are given.
    go_sources: Vec<String>,
    /// `GOROOT` once the go command was found.
    go_root: Option<String>,
    /// Packages followed so far (bounded by [`goimport::MAX_PACKAGES`]).
    go_packages: HashSet<String>,
    process: Process,
}

impl<'v> Plan<'v> {
    /// The first round: the program, its first argument if a Python script, and the
    /// runtime files the image has.
    pub fn new(view: &'v MergedView<'v>, process: Process) -> Plan<'v> {
        let mut plan = Plan {
            view,
            path: split_path(process.path.as_deref().unwrap_or(runtime::DEFAULT_PATH)),
            ld_library_path: split_path(process.ld_library_path.as_deref().unwrap_or("")),
            cwd: process.cwd.clone(),
            wanted: Vec::new(),
            seen: HashSet::new(),
            pending: Vec::new(),
            fresh: Vec::new(),
            ldcache: None,
            sonames: HashSet::new(),
            python_done: false,
            gcc_done: false,
            commands: 0,
            ranges: HashMap::new(),
            heads: HashSet::new(),
            lib_lookups: HashMap::new(),
            script_includes: Vec::new(),
            c_sources: Vec::new(),
            include_dirs: Vec::new(),
            headers: 0,
            named: 0,
            script_go_imports: Vec::new(),
            go_sources: Vec::new(),
            go_root: None,
            go_packages: HashSet::new(),
            process,
        };
        let argv = plan.process.argv.clone();
        plan.want_command(&argv, 0);
        for (path, max) in runtime::COMMON_FILES {
            if let Some(r) = view.resolve_file(path) {
                if view.node(r.found).is_some_and(|n| n.size <= *max) {
                    let role = if *path == "etc/ld.so.cache" {
                        Role::LdCache
                    } else {
                        Role::Data
                    };
                    plan.want(r, role);
                }
            }
        }
        plan
    }

    /// Every file wanted so far, in the order found.
    pub fn wanted(&self) -> &[Found] {
        &self.wanted
    }

    /// The byte ranges of `f` to fetch, when not all of it.
    pub fn ranges(&self, f: Found) -> Option<&[Range<u64>]> {
        self.ranges.get(&f).map(Vec::as_slice)
    }

    /// The files added since the last call (to fetch now); they are parsed at the next
    /// [`Plan::advance`].
    pub fn take_round(&mut self) -> Vec<Found> {
        let round: Vec<Found> = self.fresh.iter().map(|(f, _, _)| *f).collect();
        self.pending.append(&mut self.fresh);
        round
    }

    /// Parses the files of the last round that need it and adds what they name; the
    /// cache of the loader first, since libraries are looked up in it.
    pub fn advance(&mut self, files: &dyn Files) {
        self.advance_where(files, false);
    }

    /// [`Plan::advance`] for the files fetched so far only (the others stay pending),
    /// so a file's libraries are asked for as soon as it is in, not once its whole
    /// batch is. Nothing is parsed while the loader's cache is awaited.
    pub fn advance_ready(&mut self, files: &dyn Files) {
        self.advance_where(files, true);
    }

    /// Whether nothing is left to parse.
    pub fn settled(&self) -> bool {
        self.pending.is_empty() && self.fresh.is_empty()
    }

    fn advance_where(&mut self, files: &dyn Files, only_ready: bool) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|(_, _, role)| *role != Role::LdCache);
        let mut awaiting_cache = false;
        for (found, path, role) in pending {
            let ready =
                !only_ready || files.ready(found, self.ranges.get(&found).map(Vec::as_slice));
            if !ready || awaiting_cache {
                awaiting_cache |= role == Role::LdCache;
                self.pending.push((found, path, role));
                continue;
            }
            if self.heads.remove(&found) {
                // Its program headers are here: fetch what they say is worth it, then
                // parse it as planned.
                match files.load_ranges(found) {
                    Some(r) => self.ranges.insert(found, r),
                    None => self.ranges.remove(&found),
                };
                self.fresh.push((found, path, role));
                continue;
            }
            match role {
                Role::Data => {}
                Role::LdCache => {
                    if let Some(data) = files.whole(found, ldcache::MAX_CACHE_BYTES) {
                        self.ldcache = LdCache::parse(&data);
                    }
                }
                Role::Program { scripts } => self.program(files, found, &path, scripts),
                Role::Library { depth } => self.library(files, found, &path, depth),
                Role::Header { depth } => self.header(files, found, &path, depth),
                Role::Config => self.config(files, found),
                Role::GoSource => self.go_source(files, found),
            }
        }
    }

    /// Adds `r` to the next round unless it is wanted already; whether it was added.
    fn want(&mut self, r: Resolved, role: Role) -> bool {
        if self.seen.len() >= MAX_FILES || !self.seen.insert(r.found) {
            return false;
        }
        let code = matches!(role, Role::Program { .. } | Role::Library { .. });
        if code
            && self
                .view
                .node(r.found)
                .is_some_and(|n| n.size > elf::LARGE_FILE)
        {
            self.ranges
                .insert(r.found, std::iter::once(0..elf::HEAD_BYTES).collect());
            self.heads.insert(r.found);
        }
        self.wanted.push(r.found);
        self.fresh.push((r.found, r.path, role));
        true
    }

    /// The program of `argv` and, when it is a shell given a script (`sh -c`) or `su`
    /// given a command, the programs the script runs, `depth` scripts deep.
    fn want_command(&mut self, argv: &[String], depth: u32) {
        let Some(argv0) = argv.first() else {
            return;
        };
        let base = argv0.rsplit('/').next().unwrap_or_default();
        let args = &argv[1..];
        let compiler = runtime::gcc_driver(base).is_some();
        if let Some(r) = self.find_program(argv0) {
            self.want(r, Role::Program { scripts: 0 });
            // A compiler's sources are followed through their includes instead.
            let named: Vec<String> = args
                .iter()
                .filter(|a| !(compiler && cinclude::is_source(a)))
                .cloned()
                .collect();
            self.want_named_paths(&named);
        }
        if base == "go" {
            let sources = args.iter().filter(|a| a.ends_with(".go") && a.len() > 3);
            add_bounded(&mut self.go_sources, sources.cloned());
        }
        if compiler {
            let sources = args.iter().filter(|a| cinclude::is_source(a));
            add_bounded(&mut self.c_sources, sources.cloned());
        }
        if depth >= MAX_SCRIPTS {
            return;
        }
        let script = if shell::is_shell(base) {
            shell::script_arg(args)
        } else if matches!(base, "su" | "runuser") {
            shell::su_command(args)
        } else {
            None
        };
        if let Some(script) = script {
            add_bounded(&mut self.script_go_imports, goimport::in_script(script));
            add_bounded(&mut self.script_includes, cinclude::in_script(script));
            for command in shell::commands(script) {
                if self.commands >= MAX_COMMANDS {
                    break;
                }
                self.commands += 1;
                self.want_command(&command, depth + 1);
            }
        }
    }

    /// What a program's arguments name by absolute path (`/app/main.py`, `-D
    /// /var/lib/db`, `config_file=/etc/db.conf`): it opens them at start. An
    /// executable comes as a program; another file whole (and is looked at for the
    /// paths it names); a directory brings its small files two levels down, unless it
    /// is a system directory.
    fn want_named_paths(&mut self, args: &[String]) {
        for arg in args.iter().take(named::MAX_ARGS) {
            let path = match arg.split_once('=') {
                Some((_, v)) if !arg.starts_with('/') => v,
                _ => arg.as_str(),
            };
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                continue;
            }
            if self.named >= named::MAX_PATHS {
                return;
            }
            let Some(r) = self.view.resolve(path, true) else {
                continue;
            };
            let Some(node) = self.view.node(r.found) else {
                continue;
            };
            match node.kind {
                // A program given a program (`tini -- /app/server`, `su -s /bin/sh`)
                // may run it: its libraries come too.
                NodeKind::Reg if node.mode & 0o111 != 0 => {
                    self.named += 1;
                    self.want(r, Role::Program { scripts: 0 });
                }
                NodeKind::Reg if node.size <= named::MAX_FILE => {
                    self.named += 1;
                    let role = if node.size <= named::MAX_CONFIG {
                        Role::Config
                    } else {
                        Role::Data
                    };
                    self.want(r, role);
                }
                NodeKind::Dir if !named::is_system_dir(&r.path) => {
                    self.named += 1;
                    self.want_small_files_under(&r.path);
                }
                _ => {}
            }
        }
    }

    /// The small regular files of directory `dir` and of its subdirectories, the
    /// shallower first, each directory's in name order, within [`named`]'s bounds.
    fn want_small_files_under(&mut self, dir: &str) {
        let (mut files, mut bytes) = (0usize, 0u64);
        let mut level = vec![dir.to_string()];
        for _ in 0..named::DIR_DEPTH {
            let mut next = Vec::new();
            for d in &level {
                for name in self.view.list_dir(d) {
                    let p = format!("{d}/{name}");
                    let Some(r) = self.view.resolve(&p, false) else {
                        continue;
                    };
                    let Some(node) = self.view.node(r.found) else {
                        continue;
                    };
                    match node.kind {
                        NodeKind::Dir if next.len() < named::DIR_SUBDIRS => next.push(p),
                        NodeKind::Reg if node.size <= named::DIR_FILE_MAX => {
                            if files >= named::DIR_FILES || bytes + node.size > named::DIR_BYTES {
                                return;
                            }
                            if self.want(r, Role::Data) {
                                files += 1;
                                bytes += node.size;
                            }
                        }
                        _ => {}
                    }
                }
            }
            level = next;
        }
    }

    /// The absolute paths a small configuration file names (`hba_file =
    /// '/etc/db/hba.conf'`): the regular files among them come too.
    fn config(&mut self, files: &dyn Files, found: Found) {
        let Some(text) = files.whole(found, named::MAX_CONFIG) else {
            return;
        };
        for path in named::paths_in(&text) {
            if let Some(r) = self.view.resolve_file(&path) {
                if self
                    .view
                    .node(r.found)
                    .is_some_and(|n| n.size <= named::MAX_FILE)
                {
                    self.want(r, Role::Data);
                }
            }
        }
    }

    /// The regular file at `path`, taken from the working directory when relative.
    fn resolve_from_cwd(&self, path: &str) -> Option<Resolved> {
        if path.starts_with('/') {
            self.view.resolve_file(path)
        } else {
            self.view.resolve_file(&format!("{}/{path}", self.cwd))
        }
    }

    /// `name` as the runtime finds the program to exec: a path (from the working
    /// directory when relative), else the first executable file in `PATH`.
    fn find_program(&self, name: &str) -> Option<Resolved> {
        if name.is_empty() {
            return None;
        }
        if name.contains('/') {
            return self.resolve_from_cwd(name);
        }
        self.path.iter().find_map(|dir| {
            let r = self.view.resolve_file(&format!("{dir}/{name}"))?;
            let exec = self.view.node(r.found)?.mode & 0o111 != 0;
            exec.then_some(r)
        })
    }

    fn program(&mut self, files: &dyn Files, found: Found, path: &str, scripts: u32) {
        let Some(head) = files.head(found, SHEBANG_BYTES) else {
            return;
        };
        if let Some((interp, arg)) = shebang(&head) {
            if scripts >= MAX_SCRIPTS {
                return;
            }
            // `#!/usr/bin/env python3` runs what PATH finds for python3.
            let base = interp.rsplit('/').next().unwrap_or_default();
            let target = if base == "env" {
                let prog = arg
                    .as_deref()
                    .and_then(|a| a.split_whitespace().find(|w| !w.starts_with('-')));
                let env = self.view.resolve_file(&interp);
                if let Some(env) = env {
                    self.want(
                        env,
                        Role::Program {
                            scripts: scripts + 1,
                        },
                    );
                }
                prog.and_then(|p| self.find_program(p))
            } else {
                self.view.resolve_file(&interp)
            };
            if let Some(t) = target {
                self.want(
                    t,
                    Role::Program {
                        scripts: scripts + 1,
                    },
                );
            }
            return;
        }
        if elf::is_elf(&head) {
            self.maybe_python(path);
            self.maybe_runtime(path);
            self.library(files, found, path, 0);
        }
    }

    fn library(&mut self, files: &dyn Files, found: Found, path: &str, depth: u32) {
        let Some(deps) = files.elf(found) else {
            return;
        };
        if let Some(interp) = &deps.interp {
            if let Some(r) = self.view.resolve_file(interp) {
                self.want(r, Role::Library { depth: depth + 1 });
            }
        }
        if depth >= MAX_DEPTH {
            return;
        }
        let origin = path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        for name in &deps.needed {
            if self.sonames.len() >= MAX_LIBS {
                break;
            }
            if !self.sonames.insert(name.clone()) && !name.contains('/') {
                continue;
            }
            if let Some(r) = self.find_library(name, &deps, &origin) {
                self.want(r, Role::Library { depth: depth + 1 });
            }
        }
    }

    /// The loader's search: a name with a slash as is; else `DT_RPATH` (without a
    /// runpath), `LD_LIBRARY_PATH`, `DT_RUNPATH`, the cache, the default directories.
    fn find_library(&mut self, name: &str, deps: &ElfDeps, origin: &str) -> Option<Resolved> {
        if name.contains('/') {
            return self.view.resolve_file(name);
        }
        let expand = |dirs: &[String]| -> Vec<String> {
            dirs.iter()
                .take(64)
                .filter_map(|d| {
                    let d = d.replace("${ORIGIN}", &format!("/{origin}"));
                    let d = d.replace("$ORIGIN", &format!("/{origin}"));
                    (!d.contains('$') && !d.is_empty()).then_some(d)
                })
                .collect()
        };
        let mut dirs = Vec::new();
        if deps.runpath.is_empty() {
            dirs.extend(expand(&deps.rpath));
        }
        dirs.extend(self.ld_library_path.iter().take(64).cloned());
        let runpath = expand(&deps.runpath);
        let specific = !dirs.is_empty() || !runpath.is_empty();
        dirs.extend(runpath);
        for d in &dirs {
            if let Some(r) = self.view.resolve_file(&format!("{d}/{name}")) {
                return Some(r);
            }
        }
        // The same soname found through the common path once is found so again.
        if !specific {
            if let Some(r) = self.lib_lookups.get(name) {
                return r.clone();
            }
        }
        let from_cache = self
            .ldcache
            .as_ref()
            .and_then(|c| c.get(name))
            .and_then(|p| self.view.resolve_file(p));
        let r = from_cache.or_else(|| {
            runtime::DEFAULT_LIB_DIRS
                .iter()
                .find_map(|d| self.view.resolve_file(&format!("{d}/{name}")))
        });
        self.lib_lookups.insert(name.to_string(), r.clone());
        r
    }

    /// A JVM launcher, a C compiler driver or the Go command: what it loads or runs at
    /// once.
    fn maybe_runtime(&mut self, path: &str) {
        if let Some(home) = runtime::java_home(path) {
            let home = home.to_string();
            for (rel, kind) in runtime::JAVA_FILES {
                self.want_path(&format!("{home}/{rel}"), *kind);
            }
        }
        if runtime::is_node(path.rsplit('/').next().unwrap_or_default()) {
            for f in runtime::NODE_FILES {
                self.want_path(f, runtime::Kind::Data);
            }
        }
        if let (Some(root), Some(tools)) = (runtime::go_root(path), runtime::go_host_tools()) {
            let root = root.to_string();
            for tool in runtime::GO_TOOLS {
                self.want_path(
                    &format!("{root}/pkg/tool/{tools}/{tool}"),
                    runtime::Kind::Program,
                );
            }
            if self.go_root.is_none() {
                self.go_root = Some(root);
                self.want_go_inputs();
            }
        }
        let base = path.rsplit('/').next().unwrap_or_default();
        let Some(cxx) = runtime::gcc_driver(base) else {
            return;
        };
        if std::mem::replace(&mut self.gcc_done, true) {
            return;
        }
        // `gcc-12` runs the compiler of version 12; a bare `gcc` the one installed.
        let version = base
            .rsplit_once('-')
            .map(|(_, v)| v)
            .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'));
        let compiler = if cxx { "cc1plus" } else { "cc1" };
        for triple in self.view.list_dir("usr/lib/gcc").into_iter().take(4) {
            let triple_dir = format!("usr/lib/gcc/{triple}");
            let versions: Vec<String> = self
                .view
                .list_dir(&triple_dir)
                .into_iter()
                .filter(|v| version.is_none_or(|want| v == want))
                .take(2)
                .collect();
            if versions.is_empty() {
                continue;
            }
            for v in versions {
                let dir = format!("{triple_dir}/{v}");
                if self.include_dirs.is_empty() {
                    self.include_dirs = cinclude::search_dirs(&dir, &triple, &v, cxx);
                }
                self.want_path(&format!("{dir}/{compiler}"), runtime::Kind::Program);
                for (rel, kind) in runtime::GCC_FILES {
                    self.want_path(&format!("{dir}/{rel}"), *kind);
                }
            }
            for f in runtime::GCC_LIBC_FILES {
                self.want_path(&format!("usr/lib/{triple}/{f}"), runtime::Kind::Data);
            }
        }
        for tool in runtime::GCC_TOOLS {
            if let Some(r) = self.find_program(tool) {
                self.want(r, Role::Program { scripts: 0 });
            }
        }
        self.want_compile_inputs();
    }

    /// What a compile reads first: the preincluded header, the headers that sources a
    /// script writes include, and the sources the driver is given (parsed in turn).
    fn want_compile_inputs(&mut self) {
        if self.include_dirs.is_empty() {
            return;
        }
        let preincluded = Include {
            name: cinclude::PREINCLUDED.to_string(),
            quoted: false,
            next: false,
        };
        let roots: Vec<Include> = std::iter::once(preincluded)
            .chain(std::mem::take(&mut self.script_includes))
            .collect();
        for inc in &roots {
            self.want_include(inc, None, 1);
        }
        for src in std::mem::take(&mut self.c_sources) {
            if let Some(r) = self.resolve_from_cwd(&src) {
                if self.headers < cinclude::MAX_HEADERS && self.want(r, Role::Header { depth: 0 }) {
                    self.headers += 1;
                }
            }
        }
    }

    /// What a Go build reads first: the packages that Go source a script writes
    /// imports, and the sources the go command is given (parsed in turn).
    fn want_go_inputs(&mut self) {
        for import in std::mem::take(&mut self.script_go_imports) {
            self.want_go_package(&import);
        }
        for src in std::mem::take(&mut self.go_sources) {
            if let Some(r) = self.resolve_from_cwd(&src) {
                self.want(r, Role::GoSource);
            }
        }
    }

    /// The imports of a Go source that arrived.
    fn go_source(&mut self, files: &dyn Files, found: Found) {
        let Some(text) = files.whole(found, goimport::MAX_SOURCE_BYTES) else {
            return;
        };
        let built = goimport::host()
            .is_some_and(|(goos, goarch)| goimport::constraint_allows(&text, goos, goarch));
        if !built {
            return;
        }
        for import in goimport::imports(&text) {
            self.want_go_package(&import);
        }
    }

    /// Every file of package `import` in `GOROOT/src` (or the standard library's
    /// vendor directory), as the go command opens them all, with the package's
    /// compiled archive; the sources built on this host are parsed for their imports.
    fn want_go_package(&mut self, import: &str) {
        let (Some(root), Some((goos, goarch)), Some(tools)) = (
            self.go_root.clone(),
            goimport::host(),
            runtime::go_host_tools(),
        ) else {
            return;
        };
        if !goimport::sane(import)
            || self.go_packages.len() >= goimport::MAX_PACKAGES
            || !self.go_packages.insert(import.to_string())
        {
            return;
        }
        let dir = [
            format!("{root}/src/{import}"),
            format!("{root}/src/vendor/{import}"),
        ]
        .into_iter()
        .find(|d| self.view.is_dir(d));
        let Some(dir) = dir else {
            return;
        };
        for name in self
            .view
            .list_dir(&dir)
            .into_iter()
            .take(goimport::MAX_PACKAGE_FILES)
        {
            let Some(r) = self.view.resolve(&format!("{dir}/{name}"), false) else {
                continue;
            };
            let fits = self
                .view
                .node(r.found)
                .is_some_and(|n| n.kind == NodeKind::Reg && n.size <= goimport::MAX_PACKAGE_FILE);
            if !fits {
                continue;
            }
            let role = if goimport::builds_here(&name, goos, goarch) {
                Role::GoSource
            } else {
                Role::Data
            };
            self.want(r, role);
        }
        self.want_path(
            &format!("{root}/pkg/{tools}/{import}.a"),
            runtime::Kind::Data,
        );
    }

    /// The includes of a source or header that arrived.
    fn header(&mut self, files: &dyn Files, found: Found, path: &str, depth: u32) {
        if depth >= cinclude::MAX_INCLUDE_DEPTH {
            return;
        }
        let Some(text) = files.whole(found, cinclude::MAX_HEADER_BYTES) else {
            return;
        };
        for inc in cinclude::directives(&text) {
            self.want_include(&inc, Some(path), depth + 1);
        }
    }

    /// The file an include directive in `from` (`None`: the command line) names, as
    /// GCC searches for it: a quoted name beside `from` first, then the search list;
    /// `#include_next` past the directory `from` was found in.
    fn want_include(&mut self, inc: &Include, from: Option<&str>, depth: u32) {
        if self.headers >= cinclude::MAX_HEADERS {
            return;
        }
        let mut candidates = Vec::new();
        if inc.quoted {
            if let Some(dir) = from.map(|f| f.rsplit_once('/').map_or("", |(d, _)| d)) {
                candidates.push(format!("{dir}/{}", inc.name));
            }
        }
        let skip = match (inc.next, from) {
            (true, Some(f)) => self
                .include_dirs
                .iter()
                .position(|d| f.starts_with(&format!("{d}/")))
                .map_or(0, |i| i + 1),
            _ => 0,
        };
        candidates.extend(
            self.include_dirs
                .iter()
                .skip(skip)
                .map(|d| format!("{d}/{}", inc.name)),
        );
        for c in candidates {
            let Some(r) = self.view.resolve_file(&c) else {
                continue;
            };
            if from == Some(r.path.as_str()) {
                continue;
            }
            if self.want(r, Role::Header { depth }) {
                self.headers += 1;
            }
            return;
        }
    }

    /// The file at `path`, if the image has it, as what `kind` says.
    fn want_path(&mut self, path: &str, kind: runtime::Kind) {
        if let Some(r) = self.view.resolve_file(path) {
            let role = match kind {
                runtime::Kind::Data | runtime::Kind::Start(_) => Role::Data,
                runtime::Kind::Library => Role::Library { depth: 1 },
                runtime::Kind::Program => Role::Program { scripts: 0 },
            };
            let found = r.found;
            if !self.want(r, role) {
                return;
            }
            if let runtime::Kind::Start(n) = kind {
                if self.view.node(found).is_some_and(|node| node.size > n) {
                    self.ranges.insert(found, std::iter::once(0..n).collect());
                }
            }
        }
    }

    /// A Python 3 program: its start-up modules, and the script it is given.
    fn maybe_python(&mut self, path: &str) {
        if self.python_done {
            return;
        }
        let base = path.rsplit('/').next().unwrap_or_default();
        let Some(minor) = runtime::python_version(base) else {
            return;
        };
        self.python_done = true;
        let minors: Vec<u32> = match minor {
            Some(m) => vec![m],
            None => self.installed_pythons(),
        };
        for m in minors {
            let ver = format!("python3.{m}");
            let tag = format!("cpython-3{m}");
            for base in runtime::PYTHON_LIB_DIRS
                .iter()
                .chain(runtime::PYTHON_SITE_DIRS)
            {
                let dir = base.replace("{}", &ver);
                if self.view.resolve(&dir, true).is_none() {
                    continue;
                }
                for module in runtime::PYTHON_STARTUP_MODULES {
                    let (pkg, name) = module.rsplit_once('/').unwrap_or(("", module));
                    let pkg_dir = if pkg.is_empty() {
                        dir.clone()
                    } else {
                        format!("{dir}/{pkg}")
                    };
                    for p in [
                        format!("{pkg_dir}/{name}.py"),
                        format!("{pkg_dir}/__pycache__/{name}.{tag}.pyc"),
                    ] {
                        if let Some(r) = self.view.resolve_file(&p) {
                            self.want(r, Role::Data);
                        }
                    }
                }
                if let Some(r) = self
                    .view
                    .resolve_file(&format!("{dir}/distutils-precedence.pth"))
                {
                    self.want(r, Role::Data);
                }
            }
        }
        // `python3 app.py`: the script is read at once.
        let script = self.process.argv.get(1).filter(|a| a.ends_with(".py"));
        if let Some(r) = script.and_then(|s| self.resolve_from_cwd(s)) {
            self.want(r, Role::Data);
        }
    }

    /// Minor versions of the `python3.N` standard libraries the image has.
    fn installed_pythons(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for dir in ["usr/local/lib", "usr/lib"] {
            for name in self.view.list_dir(dir) {
                if let Some(Some(m)) = runtime::python_version(&name) {
                    if self.view.is_dir(&format!("{dir}/{name}"))
                        && !out.contains(&m)
                        && out.len() < 4
                    {
                        out.push(m);
                    }
                }
            }
        }
        out
    }
}

/// Adds the `items` not in `list` yet, while it holds fewer than [`MAX_C_SOURCES`].
fn add_bounded<T: PartialEq>(list: &mut Vec<T>, items: impl IntoIterator<Item = T>) {
    for item in items {
        if list.len() >= MAX_C_SOURCES {
            return;
        }
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

/// The interpreter and its optional argument from a `#!` line.
pub fn shebang(head: &[u8]) -> Option<(String, Option<String>)> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    // Without a newline in the bytes read, the line is longer than the kernel takes.
    if line.len() == rest.len() && rest.len() >= SHEBANG_BYTES as usize - 2 {
        return None;
    }
    let line = std::str::from_utf8(line).ok()?.trim();
    let (interp, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim().to_string()).filter(|a| !a.is_empty())),
        None => (line, None),
    };
    (!interp.is_empty()).then(|| (interp.to_string(), arg))
}

fn split_path(s: &str) -> Vec<String> {
    s.split(':')
        .filter(|d| !d.is_empty())
        .take(64)
        .map(|d| d.trim_start_matches('/').to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "test code: a panic is a failed assertion"
    )]

    use super::*;
    use estargz::Index;

    #[test]
    fn shebang_lines() {
        assert_eq!(shebang(b"#!/bin/sh\necho"), Some(("/bin/sh".into(), None)));
        assert_eq!(
            shebang(b"#! /usr/bin/env  python3 \n"),
            Some(("/usr/bin/env".into(), Some("python3".into())))
        );
        assert_eq!(shebang(b"\x7fELF"), None);
        assert_eq!(shebang(&[b'#', b'!', b'a'].repeat(200)), None);
    }

    /// Layer contents by path, to answer [`Files`] from.
    struct Contents {
        layers: Vec<(Index, HashMap<String, Vec<u8>>)>,
    }

    impl Contents {
        fn bytes(&self, f: Found) -> Option<&Vec<u8>> {
            let (ix, files) = self.layers.get(f.layer)?;
            files.get(&ix.get(f.node)?.path)
        }
    }

    impl Files for Contents {
        fn head(&self, f: Found, len: u32) -> Option<Vec<u8>> {
            let b = self.bytes(f)?;
            Some(b[..b.len().min(len as usize)].to_vec())
        }
        fn whole(&self, f: Found, max: u64) -> Option<Vec<u8>> {
            self.bytes(f).filter(|b| b.len() as u64 <= max).cloned()
        }
        fn elf(&self, f: Found) -> Option<ElfDeps> {
            elf::parse(std::io::Cursor::new(self.bytes(f)?.clone()))
        }
        fn ready(&self, _: Found, _: Option<&[Range<u64>]>) -> bool {
            true
        }
        fn load_ranges(&self, f: Found) -> Option<Vec<Range<u64>>> {
            let b = self.bytes(f)?;
            elf::load_ranges(std::io::Cursor::new(b.clone()), b.len() as u64)
        }
    }

    /// `(path, Some(bytes) | None for a directory, link target)`.
    type Entry = (&'static str, Option<Vec<u8>>, Option<&'static str>);

    fn layer(entries: Vec<Entry>) -> (Index, HashMap<String, Vec<u8>>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut files = HashMap::new();
        for (path, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1);
            h.set_mode(0o755);
            h.set_size(0);
            if let Some(t) = link {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, t).unwrap();
            } else if let Some(d) = data {
                // Programs (ELF files and scripts) are executable, other files not.
                if !(d.starts_with(b"\x7fELF") || d.starts_with(b"#!")) {
                    h.set_mode(0o644);
                }
                h.set_size(d.len() as u64);
                b.append_data(&mut h, path, &d[..]).unwrap();
                files.insert(path.to_string(), d);
            } else {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        estargz::build(&tar[..], &mut blob, &estargz::BuildOptions::default()).unwrap();
        let ix = estargz::Reader::open(&blob, &estargz::OpenOptions::default())
            .unwrap()
            .index;
        (ix, files)
    }

    fn host(path: &str) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    /// A script run through `env` on PATH, whose interpreter is the host's `ls`: the
    /// rounds reach the script, `env`, `ls`, the loader behind a chain of links, and
    /// every library of both, through a whiteout that hides a decoy on PATH.
    #[test]
    fn script_env_elf_and_libraries_in_rounds() {
        let multiarch = "/lib/x86_64-linux-gnu";
        let libs = [
            "libc.so.6",
            "libselinux.so.1",
            "libpcre2-8.so.0",
            "ld-linux-x86-64.so.2",
        ];
        let host_files: Option<Vec<Vec<u8>>> = ["/usr/bin/ls", "/usr/bin/env"]
            .iter()
            .map(|p| p.to_string())
            .chain(libs.iter().map(|l| format!("{multiarch}/{l}")))
            .map(|p| host(&p))
            .collect();
        let Some(mut host_files) = host_files.filter(|_| std::env::consts::ARCH == "x86_64") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "host lacks ls, env or their libraries"
            );
            return;
        };
        let ls = host_files.remove(0);
        let env = host_files.remove(0);
        let lib_paths = [
            "usr/lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/x86_64-linux-gnu/libselinux.so.1",
            "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0",
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ];
        let mut bottom: Vec<Entry> = vec![
            ("usr/lib/x86_64-linux-gnu", None, None),
            ("lib", None, Some("usr/lib")),
            ("lib64", None, None),
            (
                "lib64/ld-linux-x86-64.so.2",
                None,
                Some("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            ),
            ("usr/local/bin/ls", Some(b"decoy".to_vec()), None),
            (
                "usr/lib/x86_64-linux-gnu/unused.so",
                Some(vec![0; 100]),
                None,
            ),
        ];
        for (p, d) in lib_paths.iter().zip(host_files) {
            bottom.push((p, Some(d), None));
        }
        let top: Vec<Entry> = vec![
            ("usr/local/bin/.wh.ls", Some(Vec::new()), None),
            ("usr/bin/ls", Some(ls), None),
            ("usr/bin/env", Some(env), None),
            ("app/run", Some(b"#!/usr/bin/env ls\n".to_vec()), None),
            (
                "etc/passwd",
                Some(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
                None,
            ),
        ];
        let contents = Contents {
            layers: vec![layer(bottom), layer(top)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let process = Process {
            argv: vec!["run".into()],
            path: Some("/usr/local/bin:/usr/bin:/app".into()),
            ld_library_path: None,
            cwd: "/".into(),
        };
        let mut plan = Plan::new(&view, process);
        let mut rounds = 0;
        loop {
            let round = plan.take_round();
            if round.is_empty() {
                break;
            }
            rounds += 1;
            assert!(rounds <= 8, "rounds do not end");
            plan.advance(&contents);
        }
        let paths: Vec<String> = plan
            .wanted()
            .iter()
            .map(|f| view.node(*f).unwrap().path.clone())
            .collect();
        for want in ["app/run", "usr/bin/env", "usr/bin/ls", "etc/passwd"]
            .iter()
            .chain(&lib_paths)
        {
            assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
        }
        assert!(
            !paths
                .iter()
                .any(|p| p.contains("unused") || p == "usr/local/bin/ls"),
            "{paths:?}"
        );
        // Script, then env and ls, then their libraries and loader.
        assert!((3..=5).contains(&rounds), "{rounds} rounds");
        assert_eq!(paths[0], "app/run");
    }

    /// `sh -c` running `su -c` running a server: the shell, every program the scripts
    /// run (nested, through `exec`, assignments and quotes) are wanted; builtins,
    /// programs the image lacks and words that need expanding are not.
    #[test]
    fn programs_of_shell_scripts_are_wanted() {
        let prog = |s: &str| Some(format!("#!prog {s}\n").into_bytes());
        let entries: Vec<Entry> = vec![
            ("bin/sh", prog("sh"), None),
            ("bin/su", prog("su"), None),
            ("bin/mkdir", prog("mkdir"), None),
            ("bin/chown", prog("chown"), None),
            ("bin/printf", prog("printf"), None),
            ("usr/lib/pg/bin/postgres", prog("postgres"), None),
            ("usr/bin/go", prog("go"), None),
            ("usr/bin/unused", prog("unused"), None),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let script = "mkdir -p /run/pg && chown pg:pg /run/pg && printf x > /tmp/f && \
            HOME=/tmp go run h.go && $UNSET x && \
            exec su pg -s /bin/sh -c 'exec /usr/lib/pg/bin/postgres -D /var/lib/pg'";
        let mut plan = Plan::new(&view, sh_c(script, "/usr/bin:/bin"));
        let round = plan.take_round();
        let paths: Vec<String> = round
            .iter()
            .map(|f| view.node(*f).unwrap().path.clone())
            .collect();
        for want in [
            "bin/sh",
            "bin/mkdir",
            "bin/chown",
            "usr/bin/go",
            "bin/su",
            "usr/lib/pg/bin/postgres",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
        }
        assert!(
            !paths
                .iter()
                .any(|p| p == "bin/printf" || p == "usr/bin/unused"),
            "{paths:?}"
        );
    }

    /// `sh -c SCRIPT` run from `/` with `path` as `PATH`.
    fn sh_c(script: &str, path: &str) -> Process {
        Process {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            path: Some(path.into()),
            ld_library_path: None,
            cwd: "/".into(),
        }
    }

    /// The round in which each wanted path was first wanted.
    fn rounds_of(
        contents: &Contents,
        view: &MergedView,
        process: Process,
    ) -> HashMap<String, usize> {
        let mut plan = Plan::new(view, process);
        let mut round_of = HashMap::new();
        for round in 0..16 {
            let files = plan.take_round();
            if files.is_empty() {
                break;
            }
            for f in files {
                round_of.insert(view.node(f).unwrap().path.clone(), round);
            }
            plan.advance(contents);
        }
        round_of
    }

    fn round_in(round_of: &HashMap<String, usize>, path: &str) -> usize {
        *round_of
            .get(path)
            .unwrap_or_else(|| panic!("{path} not wanted: {round_of:?}"))
    }

    /// Every wanted path once the rounds end.
    /// `argv` run from `/` with `/usr/bin` as `PATH`.
    fn usr_bin(argv: &[&str]) -> Process {
        Process {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            path: Some("/usr/bin".into()),
            ld_library_path: None,
            cwd: "/".into(),
        }
    }

    /// The plan of `process` after its rounds (at most 8) have all arrived.
    fn settled_plan<'v>(contents: &Contents, view: &'v MergedView, process: Process) -> Plan<'v> {
        let mut plan = Plan::new(view, process);
        for _ in 0..8 {
            if plan.take_round().is_empty() {
                break;
            }
            plan.advance(contents);
        }
        plan
    }

    fn plan_paths(contents: &Contents, view: &MergedView, process: Process) -> Vec<String> {
        settled_plan(contents, view, process)
            .wanted()
            .iter()
            .map(|f| view.node(*f).unwrap().path.clone())
            .collect()
    }

    /// A JVM brings the start of its module image (the index every class lookup
    /// reads), not the whole image; a small image comes whole. Node.js brings the
    /// scripts Debian's build reads at every start, when the image has them, and
    /// nothing else of `/usr/share/nodejs`.
    #[test]
    fn a_jvm_brings_its_module_index_and_node_its_shared_scripts() {
        let Some(elf) = host("/usr/bin/ls") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks /usr/bin/ls");
            return;
        };
        let big_modules = vec![7u8; (2 << 20) + 4096];
        let entries: Vec<Entry> = vec![
            ("usr/bin/java", None, Some("/opt/jdk/bin/java")),
            ("opt/jdk/bin/java", Some(elf.clone()), None),
            ("opt/jdk/lib/modules", Some(big_modules.clone()), None),
            ("opt/small/bin/java", Some(elf.clone()), None),
            ("opt/small/lib/modules", Some(vec![8u8; 4096]), None),
            ("usr/bin/node", Some(elf.clone()), None),
            ("usr/bin/nodejs", None, Some("node")),
            (
                "usr/share/nodejs/acorn/dist/acorn.js",
                Some(b"1".to_vec()),
                None,
            ),
            (
                "usr/share/nodejs/undici/undici-fetch.js",
                Some(b"2".to_vec()),
                None,
            ),
            (
                "usr/share/nodejs/lodash/index.js",
                Some(b"3".to_vec()),
                None,
            ),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let ranges_of = |argv: &[&str], path: &str| {
            let plan = settled_plan(&contents, &view, usr_bin(argv));
            let found = *plan
                .wanted()
                .iter()
                .find(|f| view.node(**f).unwrap().path == path)
                .unwrap_or_else(|| panic!("{path} not wanted"));
            plan.ranges(found).map(<[_]>::to_vec)
        };
        assert_eq!(
            ranges_of(&["java", "-version"], "opt/jdk/lib/modules"),
            Some(std::iter::once(0..2 << 20).collect())
        );
        assert_eq!(
            ranges_of(&["/opt/small/bin/java"], "opt/small/lib/modules"),
            None,
            "a module image under the start's size comes whole"
        );
        for argv in [&["node", "-e", "1"][..], &["nodejs", "x.js"][..]] {
            let node = plan_paths(&contents, &view, usr_bin(argv));
            for want in [
                "usr/share/nodejs/acorn/dist/acorn.js",
                "usr/share/nodejs/undici/undici-fetch.js",
            ] {
                assert!(node.contains(&want.to_string()), "{want} not in {node:?}");
            }
            assert!(!node.iter().any(|p| p.contains("lodash")), "{node:?}");
        }
        let java = plan_paths(&contents, &view, usr_bin(&["java", "-version"]));
        assert!(!java.iter().any(|p| p.contains("nodejs")), "{java:?}");
    }

    /// A JVM launcher reached through links brings its VM and class-data archive; a
    /// versioned GCC driver its compiler proper (of its version only), the linker's
    /// wrapper, the start files and the assembler and linker from PATH; the go
    /// command its compiler and linker (not its other tools).
    #[test]
    fn a_jvm_and_a_c_compiler_bring_what_they_load_and_run() {
        let Some(elf) = host("/usr/bin/ls") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks /usr/bin/ls");
            return;
        };
        let jdk = "usr/lib/jvm/java-17-openjdk-amd64";
        let gcc = "usr/lib/gcc/x86_64-linux-gnu";
        let entries: Vec<Entry> = vec![
            ("usr/bin/java", None, Some("/etc/alternatives/java")),
            (
                "etc/alternatives/java",
                None,
                Some("/usr/lib/jvm/java-17-openjdk-amd64/bin/java"),
            ),
            (
                "usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/jvm/java-17-openjdk-amd64/lib/jvm.cfg",
                Some(b"-server KNOWN".to_vec()),
                None,
            ),
            (
                "usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/jvm/java-17-openjdk-amd64/lib/server/classes.jsa",
                Some(vec![1; 64]),
                None,
            ),
            (
                "usr/lib/jvm/java-17-openjdk-amd64/lib/libawt.so",
                Some(elf.clone()),
                None,
            ),
            ("usr/bin/gcc", None, Some("gcc-12")),
            ("usr/bin/gcc-12", None, Some("x86_64-linux-gnu-gcc-12")),
            ("usr/bin/x86_64-linux-gnu-gcc-12", Some(elf.clone()), None),
            ("usr/bin/as", Some(elf.clone()), None),
            ("usr/bin/ld", Some(elf.clone()), None),
            (
                "usr/lib/gcc/x86_64-linux-gnu/12/cc1",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/gcc/x86_64-linux-gnu/12/collect2",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/gcc/x86_64-linux-gnu/12/crtbeginS.o",
                Some(vec![2; 64]),
                None,
            ),
            (
                "usr/lib/gcc/x86_64-linux-gnu/11/cc1",
                Some(elf.clone()),
                None,
            ),
            ("usr/lib/x86_64-linux-gnu/crt1.o", Some(vec![3; 64]), None),
            (
                "usr/lib/x86_64-linux-gnu/libc.so",
                Some(b"GROUP ( x )".to_vec()),
                None,
            ),
            ("usr/bin/go", None, Some("../lib/go-1.19/bin/go")),
            ("usr/lib/go-1.19/bin/go", Some(elf.clone()), None),
            (
                "usr/lib/go-1.19/pkg/tool/linux_amd64/compile",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/go-1.19/pkg/tool/linux_amd64/link",
                Some(elf.clone()),
                None,
            ),
            (
                "usr/lib/go-1.19/pkg/tool/linux_amd64/vet",
                Some(elf.clone()),
                None,
            ),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let java = plan_paths(&contents, &view, usr_bin(&["java", "-version"]));
        for want in [
            "bin/java",
            "lib/jvm.cfg",
            "lib/server/libjvm.so",
            "lib/server/classes.jsa",
        ] {
            let want = format!("{jdk}/{want}");
            assert!(java.contains(&want), "{want} not in {java:?}");
        }
        assert!(
            !java
                .iter()
                .any(|p| p.contains("libawt") || p.contains("gcc")),
            "{java:?}"
        );
        let cc = plan_paths(
            &contents,
            &view,
            usr_bin(&["/bin/sh", "-c", "gcc -o /tmp/h /tmp/h.c && /tmp/h"]),
        );
        for want in [
            format!("{gcc}/12/cc1"),
            format!("{gcc}/12/collect2"),
            format!("{gcc}/12/crtbeginS.o"),
            "usr/lib/x86_64-linux-gnu/crt1.o".to_string(),
            "usr/lib/x86_64-linux-gnu/libc.so".to_string(),
            "usr/bin/as".to_string(),
            "usr/bin/ld".to_string(),
        ] {
            assert!(cc.contains(&want), "{want} not in {cc:?}");
        }
        assert!(
            !cc.iter().any(|p| p.contains("/11/") || p.contains("jvm")),
            "{cc:?}"
        );
        if runtime::go_host_tools() == Some("linux_amd64") {
            let go = plan_paths(
                &contents,
                &view,
                usr_bin(&["/bin/sh", "-c", "cd /tmp && HOME=/tmp go run h.go"]),
            );
            for want in ["compile", "link"] {
                let want = format!("usr/lib/go-1.19/pkg/tool/linux_amd64/{want}");
                assert!(go.contains(&want), "{want} not in {go:?}");
            }
            assert!(
                !go.iter().any(|p| p.ends_with("/vet") || p.contains("gcc")),
                "{go:?}"
            );
        }
    }

    /// A C compile brings the headers its sources include, a level of includes per
    /// round, as GCC finds them: the compiler's own before the system's, a quoted name
    /// beside its includer, `#include_next` past the includer's directory; an include
    /// loop ends, and headers nothing includes stay out.
    #[test]
    fn a_compile_brings_its_headers_a_level_at_a_time() {
        let Some(elf) = host("/usr/bin/ls") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks /usr/bin/ls");
            return;
        };
        let h = |s: &str| Some(s.as_bytes().to_vec());
        let entries: Vec<Entry> = vec![
            ("usr/bin/gcc", Some(elf.clone()), None),
            ("usr/lib/gcc/x86_64-linux-gnu/12/cc1", Some(elf.clone()), None),
            ("usr/lib/gcc/x86_64-linux-gnu/12/include/stddef.h", h("/* gcc */"), None),
            (
                "usr/lib/gcc/x86_64-linux-gnu/12/include-fixed/limits.h",
                h("#include_next <limits.h>\n"),
                None,
            ),
            ("usr/include/stdc-predef.h", h("#define __STDC_IEC_559__ 1\n"), None),
            (
                "usr/include/stdio.h",
                h("#include <bits/libc-header-start.h>\n#define __need_size_t\n#include <stddef.h>\n#ifdef __USE_GNU\n# include \"stdio_ext.h\"\n#endif\n"),
                None,
            ),
            ("usr/include/stdio_ext.h", h("/* beside stdio.h */"), None),
            ("usr/include/stddef.h", h("/* a decoy gcc never reaches */"), None),
            ("usr/include/limits.h", h("#include <features.h>\n"), None),
            (
                "usr/include/x86_64-linux-gnu/bits/libc-header-start.h",
                h("#include <features.h>\n"),
                None,
            ),
            (
                "usr/include/features.h",
                h("#ifndef _FEATURES_H\n#include <features.h>\n#include <sys/cdefs.h>\n#endif\n"),
                None,
            ),
            ("usr/include/x86_64-linux-gnu/sys/cdefs.h", h("/* leaf */"), None),
            ("usr/include/unused.h", h("/* nobody includes this */"), None),
            ("src/app.c", h("#include \"app.h\"\nint f(void);\n"), None),
            ("src/app.h", h("#include <stdio.h>\n"), None),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let script = r"printf '#include <limits.h>\nint main(void){return 0;}\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c /src/app.c";
        let round_of = rounds_of(&contents, &view, sh_c(script, "/usr/bin"));
        let round = |p: &str| round_in(&round_of, p);
        let gcc_round = round("usr/bin/gcc");
        let predef = round("usr/include/stdc-predef.h");
        assert_eq!(predef, gcc_round + 1);
        assert_eq!(
            round("usr/lib/gcc/x86_64-linux-gnu/12/include-fixed/limits.h"),
            predef
        );
        assert_eq!(round("src/app.c"), predef);
        assert_eq!(round("usr/include/limits.h"), predef + 1);
        assert_eq!(round("src/app.h"), predef + 1);
        assert_eq!(round("usr/include/stdio.h"), predef + 2);
        assert_eq!(round("usr/include/stdio_ext.h"), predef + 3);
        round("usr/lib/gcc/x86_64-linux-gnu/12/include/stddef.h");
        assert_eq!(round("usr/include/features.h"), predef + 2);
        assert_eq!(
            round("usr/include/x86_64-linux-gnu/bits/libc-header-start.h"),
            predef + 3
        );
        assert_eq!(
            round("usr/include/x86_64-linux-gnu/sys/cdefs.h"),
            predef + 3
        );
        for never in ["usr/include/stddef.h", "usr/include/unused.h"] {
            assert!(
                !round_of.contains_key(never),
                "{never} wanted: {round_of:?}"
            );
        }
    }

    /// A server given its data directory and its configuration by absolute path gets
    /// the small files of the directory two levels down (not deeper, not large ones)
    /// and the configuration with the files it names (not those in comments); a
    /// system directory a command names brings nothing.
    #[test]
    fn paths_a_command_names_come_with_it() {
        let Some(elf) = host("/usr/bin/ls") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks /usr/bin/ls");
            return;
        };
        let small = |n: usize| Some(vec![7u8; n]);
        let data = "var/lib/postgresql/15/main";
        let conf = "etc/postgresql/15/main";
        let entries: Vec<Entry> = vec![
            ("bin/sh", Some(elf.clone()), None),
            ("bin/su", Some(elf.clone()), None),
            ("bin/chown", Some(elf.clone()), None),
            (
                "usr/lib/postgresql/15/bin/postgres",
                Some(elf.clone()),
                None,
            ),
            ("var/lib/postgresql/15/main/PG_VERSION", small(3), None),
            (
                "var/lib/postgresql/15/main/global/pg_control",
                small(8192),
                None,
            ),
            ("var/lib/postgresql/15/main/base/1/1259", small(8192), None),
            (
                "var/lib/postgresql/15/main/pg_wal/000000010000000000000001",
                small(200 << 10),
                None,
            ),
            (
                "etc/postgresql/15/main/postgresql.conf",
                Some(
                    b"data_directory = '/var/lib/postgresql/15/main'\n\
                      hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n\
                      #ident_file = '/etc/postgresql/15/main/pg_ident.conf'\n"
                        .to_vec(),
                ),
                None,
            ),
            ("etc/postgresql/15/main/pg_hba.conf", small(100), None),
            ("etc/postgresql/15/main/pg_ident.conf", small(100), None),
            ("var/lib/dpkg/status", small(100), None),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let script = "chown -R postgres /var/lib && exec su postgres -s /bin/sh -c 'exec /usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main -c config_file=/etc/postgresql/15/main/postgresql.conf'";
        let paths = plan_paths(&contents, &view, sh_c(script, "/bin"));
        for want in [
            format!("{data}/PG_VERSION"),
            format!("{data}/global/pg_control"),
            format!("{conf}/postgresql.conf"),
            format!("{conf}/pg_hba.conf"),
        ] {
            assert!(paths.contains(&want), "{want} not in {paths:?}");
        }
        for never in [
            format!("{data}/base/1/1259"),
            format!("{data}/pg_wal/000000010000000000000001"),
            format!("{conf}/pg_ident.conf"),
            "var/lib/dpkg/status".to_string(),
        ] {
            assert!(!paths.contains(&never), "{never} in {paths:?}");
        }
    }

    /// `go run` of a file a script writes brings the packages it imports, and theirs,
    /// through `GOROOT/src` behind a link and the standard library's vendor directory:
    /// every file of each package (as the go command opens them all) and its archive;
    /// what only a test file, another system's file or an ignored generator imports
    /// stays out.
    #[test]
    fn a_go_build_brings_its_packages_a_level_at_a_time() {
        let Some(elf) = host("/usr/bin/ls") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks /usr/bin/ls");
            return;
        };
        if goimport::host() != Some(("linux", "amd64")) {
            return;
        }
        let src = |s: &str| Some(s.as_bytes().to_vec());
        let go = "usr/share/go-1.19/src";
        let entries: Vec<Entry> = vec![
            ("usr/bin/go", None, Some("../lib/go-1.19/bin/go")),
            ("usr/lib/go-1.19/bin/go", Some(elf.clone()), None),
            ("usr/lib/go-1.19/src", None, Some("../../share/go-1.19/src")),
            (
                "usr/share/go-1.19/src/fmt/print.go",
                src("package fmt\nimport (\n\"errors\"\n\"internal/fmtsort\"\n\"os\"\n)\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/fmt/print_test.go",
                src("package fmt\nimport \"testing\"\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/fmt/format_windows.go",
                src("package fmt\nimport \"internal/syscall/windows\"\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/fmt/asm_amd64.s",
                src("TEXT x(SB)\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/fmt/gen.go",
                src("//go:build ignore\n\npackage main\nimport \"unused\"\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/errors/errors.go",
                src("package errors\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/internal/fmtsort/sort.go",
                src("package fmtsort\nimport \"reflect\"\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/reflect/value.go",
                src("package reflect\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/os/file.go",
                src("package os\nimport \"golang.org/x/net/dns\"\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/vendor/golang.org/x/net/dns/dns.go",
                src("package dns\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/testing/testing.go",
                src("package testing\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/internal/syscall/windows/w.go",
                src("package windows\n"),
                None,
            ),
            (
                "usr/share/go-1.19/src/unused/u.go",
                src("package unused\n"),
                None,
            ),
            (
                "usr/lib/go-1.19/pkg/linux_amd64/fmt.a",
                src("!<arch>\n"),
                None,
            ),
            (
                "usr/lib/go-1.19/pkg/linux_amd64/reflect.a",
                src("!<arch>\n"),
                None,
            ),
            (
                "usr/lib/go-1.19/pkg/linux_amd64/testing.a",
                src("!<arch>\n"),
                None,
            ),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let script = r#"mkdir -p /tmp/h && cd /tmp/h && printf 'package main\nimport "fmt"\nfunc main() { fmt.Println("hello") }\n' > h.go && GO111MODULE=off go run h.go"#;
        let round_of = rounds_of(&contents, &view, sh_c(script, "/usr/bin"));
        let round = |p: &str| round_in(&round_of, p);
        let fmt = round(&format!("{go}/fmt/print.go"));
        assert_eq!(fmt, round("usr/lib/go-1.19/bin/go") + 1);
        for same in [
            "fmt/print_test.go",
            "fmt/format_windows.go",
            "fmt/asm_amd64.s",
            "fmt/gen.go",
        ] {
            assert_eq!(round(&format!("{go}/{same}")), fmt, "{same}");
        }
        assert_eq!(round("usr/lib/go-1.19/pkg/linux_amd64/fmt.a"), fmt);
        assert_eq!(round(&format!("{go}/errors/errors.go")), fmt + 1);
        assert_eq!(round(&format!("{go}/os/file.go")), fmt + 1);
        assert_eq!(round(&format!("{go}/reflect/value.go")), fmt + 2);
        assert_eq!(round("usr/lib/go-1.19/pkg/linux_amd64/reflect.a"), fmt + 2);
        assert_eq!(
            round(&format!("{go}/vendor/golang.org/x/net/dns/dns.go")),
            fmt + 2
        );
        for never in [
            format!("{go}/testing/testing.go"),
            format!("{go}/internal/syscall/windows/w.go"),
            format!("{go}/unused/u.go"),
            "usr/lib/go-1.19/pkg/linux_amd64/testing.a".to_string(),
        ] {
            assert!(
                !round_of.contains_key(&never),
                "{never} wanted: {round_of:?}"
            );
        }
    }

    /// A library above the large-file size comes head first; its program headers then
    /// leave its read-only data out of the next round, and its own libraries follow.
    #[test]
    fn a_large_data_library_is_fetched_in_part() {
        let (Some(ls), Some(libc)) = (host("/usr/bin/ls"), host("/lib/x86_64-linux-gnu/libc.so.6"))
        else {
            assert!(std::env::var_os("CI").is_none(), "host lacks ls or libc");
            return;
        };
        if std::env::consts::ARCH != "x86_64" {
            return;
        }
        let (big, data_at, _) = elf::with_large_data(&libc, elf::LARGE_FILE).unwrap();
        let big_len = big.len() as u64;
        let entries: Vec<Entry> = vec![
            ("usr/bin/ls", Some(ls), None),
            ("usr/lib/x86_64-linux-gnu/libc.so.6", Some(big), None),
            (
                "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                Some(b"\x7fELF".to_vec()),
                None,
            ),
        ];
        let contents = Contents {
            layers: vec![layer(entries)],
        };
        let view = MergedView::new(contents.layers.iter().map(|(ix, _)| ix).collect());
        let process = Process {
            argv: vec!["ls".into()],
            path: Some("/usr/bin".into()),
            ld_library_path: None,
            cwd: "/".into(),
        };
        let libc_found = view
            .resolve_file("usr/lib/x86_64-linux-gnu/libc.so.6")
            .unwrap()
            .found;
        let mut plan = Plan::new(&view, process);
        let mut asked = Vec::new();
        for _ in 0..8 {
            let round = plan.take_round();
            if round.is_empty() {
                break;
            }
            if round.contains(&libc_found) {
                asked.push(plan.ranges(libc_found).map(<[_]>::to_vec));
            }
            plan.advance(&contents);
        }
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert_eq!(
            asked[0],
            Some(std::iter::once(0..elf::HEAD_BYTES).collect())
        );
        let parts = asked[1].clone().expect("fetched in part");
        let kept: u64 = parts.iter().map(|r| r.end - r.start).sum();
        assert!(kept < big_len / 4, "{parts:?}");
        // Nothing of the stretched data: neither its appended bytes nor, but for what
        // other segments share of its pages, its former ones.
        assert!(
            parts.iter().all(|r| r.end <= big_len - elf::LARGE_FILE),
            "{parts:?}"
        );
        assert!(
            !parts
                .iter()
                .any(|r| r.start <= data_at + (64 << 10) && r.end > data_at + (64 << 10)),
            "{parts:?}"
        );
        let paths: Vec<String> = plan
            .wanted()
            .iter()
            .map(|f| view.node(*f).unwrap().path.clone())
            .collect();
        assert!(
            paths.iter().any(|p| p.ends_with("ld-linux-x86-64.so.2")),
            "libc's own libraries follow: {paths:?}"
        );
    }
}
