//! The manifest as users write it: a TOML file (docs/GUESTS.md).
//!
//! ```toml
//! [keel]
//! quantum_ms = 10
//!
//! [[guest]]
//! name = "hello64"
//! kind = "elf"
//! image = "hello64.elf"
//! memory = "16M"
//! cmdline = "quiet debug"
//! modules = ["data.bin a b"]
//! ```
//!
//! Keel itself reads a small line format (`keel::manifest`, no general parser in the kernel);
//! this module translates the TOML into it, one line per key, and remembers which TOML line each
//! one came from, so that every error, the kernel parser's included, names the line of the file
//! the user wrote. TOML's own rules make a repeated key or a repeated `[keel]` table an error.
//! Keys are passed on as they are (the kernel parser knows which exist), so a key Keel learns
//! needs no change here.

use std::collections::BTreeMap;
use std::fmt;

use keel::manifest::{self, Manifest};
use serde::Deserialize;
use toml::{Spanned, Value};

type Table = BTreeMap<String, Spanned<Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    keel: Option<Table>,
    #[serde(default)]
    guest: Vec<Spanned<Table>>,
}

/// A manifest that cannot be used, at a line of the TOML file (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFileError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ManifestFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ManifestFileError {}

/// The kernel's text of a manifest and, for each of its lines, the TOML line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub text: String,
    origin: Vec<usize>,
}

impl Translated {
    fn push(&mut self, line: String, origin: usize) {
        self.text.push_str(&line);
        self.text.push('\n');
        self.origin.push(origin);
    }

    /// The TOML line of the kernel text's line `line` (1-based; the last line for one past it,
    /// which is where the kernel reports what a guest lacks at the end of the file).
    fn origin(&self, line: usize) -> usize {
        let last = self.origin.last().copied().unwrap_or(1);
        line.checked_sub(1)
            .and_then(|i| self.origin.get(i).copied())
            .unwrap_or(last)
    }
}

/// Parses a TOML manifest into what Keel reads: the kernel's text (packed into the ramdisk) and
/// the manifest it describes, checked by the kernel's own parser.
pub fn parse(src: &str) -> Result<(Manifest, Translated), ManifestFileError> {
    let translated = translate(src)?;
    let parsed = manifest::parse(&translated.text).map_err(|e| ManifestFileError {
        line: translated.origin(e.line),
        message: e.message,
    })?;
    Ok((parsed, translated))
}

/// The 1-based line of byte offset `at` in `src`.
fn line_of(src: &str, at: usize) -> usize {
    src.as_bytes()[..at.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A TOML syntax error of `src`, at its line.
fn toml_error(src: &str, e: &toml::de::Error) -> ManifestFileError {
    ManifestFileError {
        line: e.span().map_or(1, |s| line_of(src, s.start)),
        message: e.message().trim_end().to_string(),
    }
}

/// Translates a TOML manifest into the kernel's line format, key by key.
pub fn translate(src: &str) -> Result<Translated, ManifestFileError> {
    let file: File = toml::from_str(src).map_err(|e| {
        let ManifestFileError { line, mut message } = toml_error(src, &e);
        if src
            .lines()
            .any(|l| l.trim_start().starts_with("[guest ") && !l.contains("[[guest"))
        {
            message.push_str(
                " (this looks like the manifest format before TOML: write each guest as \
                 [[guest]] with name = \"NAME\" and quoted strings; docs/GUESTS.md shows one)",
            );
        }
        ManifestFileError { line, message }
    })?;
    let mut out = Translated {
        text: String::new(),
        origin: Vec::new(),
    };
    if let Some(keel) = &file.keel {
        let first = keel
            .values()
            .map(|v| line_of(src, v.span().start))
            .min()
            .unwrap_or(1);
        out.push("[keel]".into(), first);
        for (key, value) in keel {
            keys(src, "[keel]", key, value, &mut out)?;
        }
    }
    for guest in &file.guest {
        let at = line_of(src, guest.span().start);
        let table = guest.get_ref();
        let name = match table.get("name") {
            Some(v) => match v.get_ref() {
                Value::String(s) => (s.clone(), line_of(src, v.span().start)),
                _ => {
                    return Err(ManifestFileError {
                        line: line_of(src, v.span().start),
                        message: "a guest's name is a string: name = \"NAME\"".into(),
                    })
                }
            },
            None => {
                return Err(ManifestFileError {
                    line: at,
                    message: "a [[guest]] without a name: add name = \"NAME\"".into(),
                })
            }
        };
        if name.0.contains(['[', ']', '\n', '#']) {
            return Err(ManifestFileError {
                line: name.1,
                message: "guest names are 1-16 characters of [A-Za-z0-9_-]".into(),
            });
        }
        out.push(format!("[guest {}]", name.0), name.1);
        let owner = format!("guest {}", name.0);
        for (key, value) in table.iter().filter(|(k, _)| *k != "name") {
            keys(src, &owner, key, value, &mut out)?;
        }
    }
    Ok(out)
}

/// `src` with `[keel] key = value` set, replacing any value the file gave it (a guest's own key
/// still wins in Keel): the tests and the benchmark run a manifest again with one of Keel's
/// settings changed. Comments are not kept.
pub fn with_keel_setting(src: &str, key: &str, value: &str) -> Result<String, ManifestFileError> {
    let mut table: toml::Table = toml::from_str(src).map_err(|e| toml_error(src, &e))?;
    let keel = table
        .entry("keel")
        .or_insert_with(|| Value::Table(toml::Table::new()));
    let Value::Table(keel) = keel else {
        return Err(ManifestFileError {
            line: 1,
            message: "keel must be a table: [keel]".into(),
        });
    };
    keel.insert(key.into(), Value::String(value.into()));
    toml::to_string(&table).map_err(|e| ManifestFileError {
        line: 1,
        message: e.to_string(),
    })
}

/// One key of a table as kernel lines (`modules` gives one `module` line per entry; a table,
/// such as `policy = { window = "2s" }`, one `policy.window = 2s` line per key).
fn keys(
    src: &str,
    owner: &str,
    key: &str,
    value: &Spanned<Value>,
    out: &mut Translated,
) -> Result<(), ManifestFileError> {
    key_lines(
        owner,
        key,
        value.get_ref(),
        line_of(src, value.span().start),
        out,
    )
}

fn key_lines(
    owner: &str,
    key: &str,
    value: &Value,
    line: usize,
    out: &mut Translated,
) -> Result<(), ManifestFileError> {
    let fail = |message: String| Err(ManifestFileError { line, message });
    let (table, name) = key.rsplit_once('.').unwrap_or(("", key));
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return fail(format!("{owner}: unknown key `{key}`"));
    }
    match value {
        Value::Table(t) if table.is_empty() => {
            for (k, v) in t {
                key_lines(owner, &format!("{key}.{k}"), v, line, out)?;
            }
            Ok(())
        }
        Value::Table(_) => fail(format!("{owner}: {key} cannot hold a table")),
        Value::Array(items) if key == "modules" => {
            for item in items {
                match item {
                    Value::String(s) => {
                        out.push(format!("module = {}", text(owner, key, s, line)?), line)
                    }
                    _ => return fail(format!("{owner}: modules is a list of strings")),
                }
            }
            Ok(())
        }
        Value::Array(_) => fail(format!("{owner}: {key} takes one value, not a list")),
        v => {
            let rendered = match v {
                Value::String(s) => text(owner, key, s, line)?.to_string(),
                Value::Integer(n) if *n >= 0 => n.to_string(),
                Value::Integer(_) => return fail(format!("{owner}: {key} cannot be negative")),
                Value::Boolean(b) => b.to_string(),
                _ => {
                    return fail(format!(
                        "{owner}: {key} must be a string, a number or true/false"
                    ))
                }
            };
            out.push(format!("{key} = {rendered}"), line);
            Ok(())
        }
    }
}

/// A string value as the kernel's line format can carry it: on one line, and (except the
/// command line, which the kernel reads to the end of the line) without `#`, which starts a
/// comment there.
fn text<'a>(owner: &str, key: &str, s: &'a str, line: usize) -> Result<&'a str, ManifestFileError> {
    let fail = |message: String| Err(ManifestFileError { line, message });
    if s.contains(['\n', '\r']) {
        return fail(format!("{owner}: {key} must be on one line"));
    }
    if key != "cmdline" && s.contains('#') {
        return fail(format!("{owner}: {key} cannot contain `#`"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: &str = r#"# a comment
[keel]
quantum_ms = 5

[[guest]]
name = "mb"
kind = "multiboot"
image = "mb32.elf"
memory = "16M"
cmdline = "say # hi"
modules = ["real16.bin", "data.bin a  b"]

[[guest]]
name = "flat"
kind = "flat"
image = "real16.bin"
memory = 16777216
load = 0x7c00
restart = 3
"#;

    #[test]
    fn translates_every_kind_of_value() {
        let (m, t) = parse(KINDS).expect("a good manifest");
        assert_eq!(m.quantum_ms, 5);
        assert_eq!(m.guests.len(), 2);
        let mb = &m.guests[0];
        assert_eq!(mb.name, "mb");
        assert_eq!(mb.cmdline, "say # hi");
        assert_eq!(mb.modules, ["real16.bin", "data.bin a b"]);
        assert_eq!(mb.memory, 16 << 20);
        let flat = &m.guests[1];
        assert_eq!(
            (flat.memory, flat.load, flat.restart),
            (16 << 20, 0x7c00, 3)
        );
        assert!(t.text.starts_with("[keel]\nquantum_ms = 5\n[guest mb]\n"));
    }

    fn error(src: &str) -> ManifestFileError {
        parse(src).expect_err("the manifest is refused")
    }

    #[test]
    fn kernel_errors_name_the_toml_line() {
        let src = KINDS.replace("memory = \"16M\"", "memory = \"3M\"");
        let e = error(&src);
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("multiple of 2M"), "{e}");
        let e = error(&KINDS.replace("restart = 3", "vcpu_count = 2"));
        assert_eq!(e.line, 19, "{e}");
        assert!(e.message.contains("unknown key vcpu_count"), "{e}");
    }

    #[test]
    fn autostart_is_a_toml_boolean() {
        let (m, _) = parse(&KINDS.replace("restart = 3", "autostart = false")).unwrap();
        assert_eq!(
            m.guests.iter().map(|g| g.autostart).collect::<Vec<_>>(),
            [true, false]
        );
        let e = error(&KINDS.replace("restart = 3", "autostart = \"later\""));
        assert_eq!(e.line, 19, "{e}");
        assert!(
            e.message
                .contains("guest flat: autostart must be on or off (true or false), not `later`"),
            "{e}"
        );
    }

    #[test]
    fn what_a_guest_lacks_is_reported_at_the_guest() {
        let e = error("[[guest]]\nname = \"a\"\nkind = \"flat\"\nmemory = \"2M\"\n");
        assert!(e.message.contains("guest a has no image"), "{e}");
        assert_eq!(e.line, 2, "{e}");
        let e = error("[[guest]]\nkind = \"flat\"\n");
        assert_eq!(
            (e.line, e.message.contains("without a name")),
            (1, true),
            "{e}"
        );
    }

    #[test]
    fn a_repeated_key_or_guest_is_an_error() {
        let e = error("[[guest]]\nname = \"a\"\nkind = \"flat\"\nkind = \"elf\"\n");
        assert_eq!(e.line, 4, "{e}");
        let twice = "[[guest]]\nname = \"a\"\nkind = \"flat\"\nimage = \"x\"\nmemory = \"2M\"\n";
        let e = error(&format!("{twice}{twice}"));
        assert!(e.message.contains("guest a is defined twice"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = error("[keel]\nquantum_ms = 5\n[keel]\nquantum_ms = 6\n");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn values_the_kernel_format_cannot_carry_are_refused() {
        let base = "[[guest]]\nname = \"a\"\nkind = \"flat\"\nmemory = \"2M\"\n";
        for (extra, says) in [
            ("image = \"x#y\"", "cannot contain `#`"),
            ("cmdline = \"a\\nb\"", "one line"),
            ("load = -1", "negative"),
            ("load = 1.5", "a string, a number"),
            ("image = [\"x\"]", "not a list"),
            ("modules = [1]", "list of strings"),
            ("\"bad key\" = 1", "unknown key"),
        ] {
            let e = error(&format!("{base}{extra}\n"));
            assert_eq!(e.line, 5, "{extra}: {e}");
            assert!(e.message.contains(says), "{extra}: {e}");
        }
        let e = error("[[guest]]\nname = \"a]\"\n");
        assert!(e.message.contains("guest names"), "{e}");
        let e = error("[guests]\n");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    /// A table value (`policy = { ... }` or `[keel.policy]`) becomes one `policy.KEY` line per
    /// key, checked by the kernel's parser at the table's line.
    #[test]
    fn a_table_becomes_dotted_keys() {
        let src = "[keel]\npolicy = { start_below = \"30%\", stop_above = \"80%\", window = \"1s\" }\n\
                   [[guest]]\nname = \"a\"\nkind = \"flat\"\nimage = \"x\"\nmemory = \"2M\"\npolicy = \"on-demand\"\n";
        let (m, t) = parse(src).expect("a good manifest");
        assert!(
            t.text.contains(
                "policy.start_below = 30%\npolicy.stop_above = 80%\npolicy.window = 1s\n"
            ),
            "{}",
            t.text
        );
        assert_eq!((m.policy.start_below, m.policy.window_ms), (30, 1000));
        assert!(m.guests[0].on_demand);
        let e = error(&src.replace("\"80%\"", "\"20%\""));
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("must be under"), "{e}");
        let e = error("[keel.policy]\nwindow = \"1s\"\nstart_below = { x = 1 }\n");
        assert!(
            e.message.contains("policy.start_below cannot hold a table"),
            "{e}"
        );
        let e = error("[keel.policy]\nwindow = \"soon\"\n");
        assert!(e.message.contains("policy.window must be"), "{e}");
    }

    #[test]
    fn the_old_format_gets_a_hint() {
        let e = error("[guest a]\nkind = flat\n");
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("[[guest]]"), "{e}");
    }

    #[test]
    fn a_keel_setting_is_added_or_replaced() {
        for src in [
            KINDS,
            "[[guest]]\nname = \"a\"\nkind = \"flat\"\nimage = \"x\"\nmemory = \"2M\"\n",
        ] {
            let off = with_keel_setting(src, "apicv", "off").expect("a good manifest");
            let (m, _) = parse(&off).expect("still good");
            assert!(!m.apicv, "{off}");
            assert_eq!(
                m.guests,
                parse(src)
                    .unwrap()
                    .0
                    .guests
                    .into_iter()
                    .map(|mut g| {
                        g.apicv = Some(false);
                        g
                    })
                    .collect::<Vec<_>>()
            );
        }
        let back = with_keel_setting(
            &with_keel_setting(KINDS, "apicv", "off").unwrap(),
            "apicv",
            "on",
        );
        assert!(parse(&back.unwrap()).unwrap().0.apicv);
    }

    #[test]
    fn an_empty_file_is_a_manifest_without_guests() {
        let (m, t) = parse("").expect("empty is fine");
        assert!(m.guests.is_empty());
        assert_eq!(t.text, "");
    }
}
