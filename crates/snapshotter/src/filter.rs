//! containerd's filter language (`name==x,labels."k"!=v`) for List, over snapshot fields.
//!
//! Grammar, as containerd's `filters` package documents it:
//! `selectors := selector ("," selector)*`, `selector := fieldpath [op value]`,
//! `fieldpath := field ("." field)*`, `op := "==" | "!=" | "~="`, with quoted
//! fields and values. Several filter strings are alternatives (any may match).
//! Unquoted fields also accept `/`, `:` and `-` so that keys such as
//! `labels.containerd.io/snapshot.ref` work without quotes.

use std::collections::HashMap;

use regex::Regex;

use crate::error::{Error, Result};

/// What a filter is evaluated against.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a HashMap<String, String>,
}

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Re(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: OR over strings, AND over each string's selectors.
#[derive(Debug, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    src: &'a str,
}

impl<'a> Parser<'a> {
    fn err(&self, what: &str) -> Error {
        Error::InvalidArgument(format!(
            "filter {:?}: {what} at offset {}",
            self.src, self.pos
        ))
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// A quoted string starting at the current quote character.
    fn quoted(&mut self) -> Result<String> {
        let q = self.s[self.pos];
        self.pos += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            if c == q {
                return String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"));
            }
            if c == b'\\' && q != b'`' {
                let e = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
                self.pos += 1;
                let ch = match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    other => {
                        // For regex values (`/.../`) the backslash belongs to the pattern.
                        if q == b'/' && other != b'/' {
                            out.push(b'\\');
                        }
                        other
                    }
                };
                out.push(ch);
            } else {
                out.push(c);
            }
        }
        Err(self.err("unterminated quoted string"))
    }

    fn field(&mut self) -> Result<String> {
        match self.peek() {
            Some(b'"') | Some(b'`') => self.quoted(),
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'/' | b':') {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                if start == self.pos {
                    return Err(self.err("expected a field"));
                }
                Ok(self.src[start..self.pos].to_string())
            }
        }
    }

    fn value(&mut self) -> Result<String> {
        match self.peek() {
            Some(b'"') | Some(b'`') | Some(b'/') | Some(b'\'') => self.quoted(),
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c == b',' || c.is_ascii_whitespace() {
                        break;
                    }
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(self.err("expected a value"));
                }
                Ok(self.src[start..self.pos].to_string())
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        self.skip_ws();
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let op = if rest.starts_with(b"==") || rest.starts_with(b"!=") || rest.starts_with(b"~=") {
            let which = rest[0];
            self.pos += 2;
            self.skip_ws();
            let v = self.value()?;
            match which {
                b'=' => Op::Eq(v),
                b'!' => Op::Ne(v),
                _ => Op::Re(Regex::new(&v).map_err(|e| self.err(&format!("bad regex: {e}")))?),
            }
        } else {
            Op::Present
        };
        self.skip_ws();
        Ok(Selector { path, op })
    }

    fn selectors(&mut self) -> Result<Vec<Selector>> {
        let mut out = vec![self.selector()?];
        while self.peek() == Some(b',') {
            self.pos += 1;
            out.push(self.selector()?);
        }
        if self.pos != self.s.len() {
            return Err(self.err("unexpected input"));
        }
        Ok(out)
    }
}

impl Filter {
    /// Parses containerd filter strings; none (or only empty ones) match everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any_of = Vec::new();
        for f in filters {
            let src = f.as_ref();
            if src.trim().is_empty() {
                // An empty filter string matches all, like containerd's.
                return Ok(Filter::default());
            }
            let mut p = Parser {
                s: src.as_bytes(),
                pos: 0,
                src,
            };
            any_of.push(p.selectors()?);
        }
        Ok(Filter { any_of })
    }

    /// Whether `f` passes the filter.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|s| s.matches(f)))
    }
}

impl Selector {
    fn matches(&self, f: &Fields<'_>) -> bool {
        let value: Option<&str> = match self.path[0].as_str() {
            "name" if self.path.len() == 1 => Some(f.name).filter(|v| !v.is_empty()),
            "parent" if self.path.len() == 1 => Some(f.parent).filter(|v| !v.is_empty()),
            "kind" if self.path.len() == 1 => Some(f.kind),
            "labels" if self.path.len() > 1 => {
                f.labels.get(&self.path[1..].join(".")).map(String::as_str)
            }
            "labels" => {
                return matches!(self.op, Op::Present) && !f.labels.is_empty();
            }
            _ => None,
        };
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Eq(want), v) => v.unwrap_or("") == want,
            (Op::Ne(want), v) => v.unwrap_or("") != want,
            (Op::Re(re), Some(v)) => re.is_match(v),
            (Op::Re(_), None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a HashMap<String, String>) -> Fields<'a> {
        Fields {
            name: "sha256:abc",
            parent: "p1",
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn containerd_forms() {
        let mut l = HashMap::new();
        l.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:abc".to_string(),
        );
        l.insert("x".to_string(), "1".to_string());
        let f = fields(&l);
        let ok = |s: &str| Filter::parse(&[s]).unwrap().matches(&f);
        assert!(ok(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p1""#
        ));
        assert!(!ok(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p2""#
        ));
        assert!(ok("labels.containerd.io/snapshot.ref==sha256:abc"));
        assert!(ok("name==sha256:abc"));
        assert!(ok("kind==committed,labels.x"));
        assert!(!ok("labels.y"));
        assert!(ok("labels.y!=1"));
        assert!(ok("name~=/^sha256:/"));
        assert!(ok("name~=\"ab\""));
        assert!(ok(""));
        assert!(Filter::parse(&["name==a", "name==sha256:abc"])
            .unwrap()
            .matches(&f));
        assert!(Filter::parse(&["name=="]).is_err());
        assert!(Filter::parse(&["name~=/(/"]).is_err());
        assert!(Filter::parse(&["name==\"x"]).is_err());
    }
}
