//! Profiles: parse the TOML, merge the environment overlay (and test overlays),
//! deserialize strictly into the typed model, validate. Every error carries the
//! file, line, column and field it is about.

pub mod model;
pub mod source;
pub mod systemd_time;
mod validate;

pub use validate::{check_image, is_unit_safe, parse_publish, public_tcp_port, Publish};

pub use model::*;
use sha2::{Digest, Sha256};
use source::{path_string, Seg, Source, SourceMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// A profile error: where, which field, what, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Dotted key path (`containers.caddy.publish[1]`); empty for file-level errors.
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProfileError {}

/// Several errors found in one pass (validation reports all it finds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileErrors(pub Vec<ProfileError>);

impl fmt::Display for ProfileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProfileErrors {}

impl From<ProfileError> for ProfileErrors {
    fn from(e: ProfileError) -> Self {
        ProfileErrors(vec![e])
    }
}

/// A loaded, merged and validated profile.
#[derive(Debug, Clone)]
pub struct Host {
    pub profile: Profile,
    /// Selected environment name.
    pub env: String,
    /// The profile file.
    pub path: PathBuf,
    /// Directory holding the profile (peer profiles are looked up here).
    pub dir: PathBuf,
    /// sha256 of the merged profile and environment name.
    pub digest: String,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.profile.host.name
    }
}

/// Options for loading: which environment, which extra overlay files.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub env: Option<String>,
    pub overlays: Vec<PathBuf>,
}

/// Resolves what a user typed (`services`, `profiles/services.toml`) to a file.
pub fn resolve(arg: &str, search_dir: &Path) -> Option<PathBuf> {
    let p = Path::new(arg);
    if arg.ends_with(".toml") || arg.contains('/') {
        return p.is_file().then(|| p.to_path_buf());
    }
    [
        search_dir.join("profiles").join(format!("{arg}.toml")),
        search_dir.join(format!("{arg}.toml")),
    ]
    .into_iter()
    .find(|c| c.is_file())
}

fn file_error(path: &Path, message: String, hint: Option<String>) -> ProfileError {
    ProfileError {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        field: String::new(),
        message,
        hint,
    }
}

fn read_source(path: &Path, prefix: Vec<Seg>) -> Result<(Source, toml::Value), ProfileError> {
    let bytes = std::fs::read(path)
        .map_err(|e| file_error(path, format!("cannot read profile: {e}"), None))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let off = e.utf8_error().valid_up_to();
            let valid = String::from_utf8_lossy(&e.as_bytes()[..off]).into_owned();
            let (line, col) = source::line_col(&valid, off);
            return Err(ProfileError {
                file: path.to_path_buf(),
                line,
                col,
                field: String::new(),
                message: "file is not valid UTF-8".into(),
                hint: Some("TOML files must be UTF-8; re-save the file as UTF-8".into()),
            });
        }
    };
    let src = Source::parse(path, text, prefix).map_err(|(span, msg)| {
        let (line, col) = span
            .map(|s| {
                source::line_col(
                    &String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()),
                    s.start,
                )
            })
            .unwrap_or((1, 1));
        ProfileError {
            file: path.to_path_buf(),
            line,
            col,
            field: String::new(),
            message: format!("TOML syntax error: {msg}"),
            hint: Some("check quoting, brackets and `key = value` syntax on that line".into()),
        }
    })?;
    let value: toml::Value = toml::from_str(&src.text).map_err(|e| {
        let (line, col) = e.span().map(|s| src.line_col(s.start)).unwrap_or((1, 1));
        ProfileError {
            file: path.to_path_buf(),
            line,
            col,
            field: String::new(),
            message: format!("TOML error: {}", e.message()),
            hint: None,
        }
    })?;
    Ok((src, value))
}

/// Tables merge key by key; anything else (values, arrays) is replaced.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn at(
    map: &SourceMap,
    path: &[Seg],
    message: impl Into<String>,
    hint: Option<String>,
) -> ProfileError {
    let (file, line, col) = map.locate(path);
    ProfileError {
        file,
        line,
        col,
        field: path_string(path),
        message: message.into(),
        hint,
    }
}

/// Turns a serde error with its path into a located error. Unknown keys get the key
/// appended so the position is the key itself.
fn serde_error(map: &SourceMap, err: serde_path_to_error::Error<toml::de::Error>) -> ProfileError {
    let mut path: Vec<Seg> = Vec::new();
    for seg in err.path().iter() {
        match seg {
            serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    let msg = err.inner().message().trim().to_string();
    let mut hint = None;
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let key = &rest[..end];
            if path.last() != Some(&Seg::Key(key.to_string())) {
                path.push(Seg::Key(key.to_string()));
            }
            hint = Some("fix the spelling or remove the key: unknown keys are errors".into());
        }
    } else if msg.starts_with("missing field") {
        hint = Some("add the field; see docs/profile-reference.md".into());
    } else if msg.starts_with("unknown variant") {
        hint = Some("use one of the listed values".into());
    } else if msg.starts_with("invalid type") {
        hint = Some("check the value's type (quoted string, number, list, table)".into());
    }
    at(map, &path, msg, hint)
}

/// Loads `path` with the environment and overlays, validates it, and returns the host.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Host, ProfileErrors> {
    let mut map = SourceMap::default();
    let (base_src, mut merged) = read_source(path, vec![])?;
    map.sources.push(base_src);

    let default_env = merged
        .get("host")
        .and_then(|h| h.get("default_env"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let envs = merged
        .get("environments")
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default();
    let env = match (&opts.env, &default_env) {
        (Some(e), _) => e.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(at(
                &map,
                &["host".into()],
                "missing field `default_env`",
                Some("state the default environment, e.g. default_env = \"production\"".into()),
            )
            .into())
        }
    };
    match envs.get(&env) {
        Some(overlay) => {
            if !overlay.is_table() {
                return Err(at(
                    &map,
                    &["environments".into(), env.as_str().into()],
                    "an environment must be a table",
                    None,
                )
                .into());
            }
            let mut overlay = overlay.clone();
            if let Some(t) = overlay.as_table_mut() {
                if t.contains_key("environments") {
                    return Err(at(
                        &map,
                        &[
                            "environments".into(),
                            env.as_str().into(),
                            "environments".into(),
                        ],
                        "environments cannot nest",
                        None,
                    )
                    .into());
                }
            }
            // The environment's keys are found under `environments.<env>` of the same file.
            let again = Source::parse(
                path,
                map.sources[0].text.clone(),
                vec!["environments".into(), env.as_str().into()],
            )
            .map_err(|(_, m)| file_error(path, m, None))?;
            map.sources.push(again);
            merge(&mut merged, overlay);
        }
        None if Some(&env) == default_env.as_ref() => {}
        None => {
            let known: Vec<&str> = envs.keys().map(String::as_str).collect();
            return Err(at(
                &map,
                &["environments".into()],
                format!("environment `{env}` is not defined in this profile"),
                Some(format!(
                    "defined environments: {}",
                    if known.is_empty() {
                        "(none)".into()
                    } else {
                        known.join(", ")
                    }
                )),
            )
            .into());
        }
    }

    for ov in &opts.overlays {
        let (src, mut value) = read_source(ov, vec![])?;
        map.sources.push(src);
        // `replace = ["containers", ...]` swaps whole tables instead of merging, so a
        // test overlay can drop every app of the real profile.
        if let Some(t) = value.as_table_mut() {
            if let Some(rep) = t.remove("replace") {
                let Some(list) = rep.as_array() else {
                    return Err(at(
                        &map,
                        &["replace".into()],
                        "`replace` must be a list of top-level table names",
                        None,
                    )
                    .into());
                };
                for (i, name) in list.iter().enumerate() {
                    let Some(name) = name.as_str() else {
                        return Err(at(
                            &map,
                            &["replace".into(), i.into()],
                            "expected a table name",
                            None,
                        )
                        .into());
                    };
                    if let Some(m) = merged.as_table_mut() {
                        m.remove(name);
                    }
                }
            }
        }
        merge(&mut merged, value);
    }

    let profile: Profile =
        serde_path_to_error::deserialize(merged.clone()).map_err(|e| serde_error(&map, e))?;

    let errors = validate::validate(&profile, &env, path, &map);
    if !errors.is_empty() {
        return Err(ProfileErrors(errors));
    }

    let mut h = Sha256::new();
    h.update(env.as_bytes());
    h.update([0]);
    h.update(toml::to_string(&merged).unwrap_or_default().as_bytes());
    let digest = hex::encode(h.finalize());
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(Host {
        profile,
        env,
        path: path.to_path_buf(),
        dir,
        digest,
    })
}

pub(crate) fn locate_error(
    map: &SourceMap,
    path: &[Seg],
    message: impl Into<String>,
    hint: Option<String>,
) -> ProfileError {
    at(map, path, message, hint)
}
