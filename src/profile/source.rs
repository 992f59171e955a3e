//! Where each key of a profile came from: file, line and column, so every error
//! (syntax, type, validation) points at the text the user wrote.

use std::ops::Range;
use std::path::{Path, PathBuf};
use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// Renders `containers.caddy.publish[1]`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A parsed source file that keeps spans.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    pub doc: ImDocument<String>,
    /// Prefix under which this source's keys live (e.g. `environments.staging`).
    pub prefix: Vec<Seg>,
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a Table),
}

impl<'a> Node<'a> {
    fn child(self, seg: &Seg) -> Option<Node<'a>> {
        match (self, seg) {
            (Node::Table(t), Seg::Key(k)) => t.get(k).map(Node::Item),
            (Node::Item(i), Seg::Key(k)) => match i {
                Item::Table(t) => t.get(k).map(Node::Item),
                Item::Value(Value::InlineTable(t)) => t.get(k).map(Node::Value),
                _ => None,
            },
            (Node::Value(Value::InlineTable(t)), Seg::Key(k)) => t.get(k).map(Node::Value),
            (Node::Item(Item::ArrayOfTables(a)), Seg::Index(n)) => a.get(*n).map(Node::Table),
            (Node::Item(Item::Value(Value::Array(a))), Seg::Index(n)) => a.get(*n).map(Node::Value),
            (Node::Value(Value::Array(a)), Seg::Index(n)) => a.get(*n).map(Node::Value),
            _ => None,
        }
    }

    fn key_span(self, seg: &Seg) -> Option<Range<usize>> {
        let Seg::Key(k) = seg else { return None };
        match self {
            Node::Table(t) => t.key(k).and_then(|k| k.span()),
            Node::Item(Item::Table(t)) => t.key(k).and_then(|k| k.span()),
            Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
                t.key(k).and_then(|k| k.span())
            }
            _ => None,
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(Item::Value(v)) | Node::Value(v) => v.span(),
            Node::Item(Item::Table(t)) | Node::Table(t) => t.span(),
            Node::Item(Item::ArrayOfTables(a)) => a.span(),
            Node::Item(Item::None) => None,
        }
    }
}

impl Source {
    pub fn parse(
        path: &Path,
        text: String,
        prefix: Vec<Seg>,
    ) -> Result<Source, (Option<Range<usize>>, String)> {
        match ImDocument::parse(text.clone()) {
            Ok(doc) => Ok(Source {
                path: path.to_path_buf(),
                text,
                doc,
                prefix,
            }),
            Err(e) => Err((e.span(), e.message().trim().to_string())),
        }
    }

    /// Span of the deepest existing prefix of `path`, and how many segments matched.
    /// The key's span (or, for list items, the value's) of the deepest part that exists.
    fn lookup(&self, path: &[Seg]) -> Option<(usize, Range<usize>)> {
        let full: Vec<Seg> = self
            .prefix
            .iter()
            .cloned()
            .chain(path.iter().cloned())
            .collect();
        let mut node = Node::Table(self.doc.as_table());
        let mut best: Option<(usize, Range<usize>)> = None;
        for (i, seg) in full.iter().enumerate() {
            let key_span = node.key_span(seg);
            match node.child(seg) {
                Some(next) => {
                    // Point at the key the user wrote (its line and column), else the value.
                    let sp = key_span.or(next.span());
                    if i + 1 >= self.prefix.len() {
                        if let Some(sp) = sp {
                            best = Some(((i + 1).saturating_sub(self.prefix.len()), sp));
                        }
                    }
                    node = next;
                }
                None => break,
            }
        }
        best
    }

    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        line_col(&self.text, offset)
    }
}

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|p| p + 1)
        .unwrap_or(0);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// All sources of one loaded profile, searched from the last applied to the first.
#[derive(Default)]
pub struct SourceMap {
    pub sources: Vec<Source>,
}

impl SourceMap {
    /// The file, line and column that defines `path` (or its nearest existing parent).
    pub fn locate(&self, path: &[Seg]) -> (PathBuf, usize, usize) {
        let mut best: Option<(usize, &Source, Range<usize>)> = None;
        for src in self.sources.iter().rev() {
            if let Some((depth, span)) = src.lookup(path) {
                if best.as_ref().is_none_or(|(d, _, _)| depth > *d) {
                    best = Some((depth, src, span));
                }
                if depth == path.len() {
                    break;
                }
            }
        }
        match best {
            Some((_, src, span)) => {
                let (l, c) = src.line_col(span.start);
                (src.path.clone(), l, c)
            }
            None => match self.sources.first() {
                Some(s) => (s.path.clone(), 1, 1),
                None => (PathBuf::new(), 0, 0),
            },
        }
    }
}
