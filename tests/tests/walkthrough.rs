//! docs/GUESTS.md, "Your own guest, from an empty directory": its `sh` blocks, run as they stand
//! in an empty directory (assembling and linking a flat binary and a multiboot C kernel, building
//! the demo's guest, `cargo keel image` and `cargo keel run` with `--files`), so the walk-through
//! stays true. Blocks fenced `sh no-test` (Linux, which needs a kernel of the reader's) are left
//! out.

use std::process::Command;

const SECTION: &str = "## Your own guest, from an empty directory";

/// The `sh` blocks of the walk-through section of `doc`, in order, as one script.
fn walkthrough_script(doc: &str) -> Result<String, String> {
    let start = doc
        .find(SECTION)
        .ok_or_else(|| format!("docs/GUESTS.md has no section `{SECTION}`"))?;
    let body = &doc[start + SECTION.len()..];
    let body = body.find("\n## ").map_or(body, |end| &body[..end]);
    let mut script = String::new();
    let mut in_block: Option<bool> = None;
    for line in body.lines() {
        match (in_block, line.strip_prefix("```")) {
            (None, Some(info)) => in_block = Some(info.trim() == "sh"),
            (Some(_), Some("")) => in_block = None,
            (Some(true), _) => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    if in_block.is_some() {
        return Err("an unclosed code block in the walk-through".into());
    }
    Ok(script)
}

#[test]
fn the_blocks_are_found() {
    let doc = "## Your own guest, from an empty directory\ntext\n```sh\necho a\n```\n\
               ```text\nnot run\n```\n```sh no-test\nnot run\n```\n```sh\necho b\n```\n\
               ## Next\n```sh\nnot this\n```\n";
    assert_eq!(walkthrough_script(doc), Ok("echo a\necho b\n".into()));
}

#[test]
fn walkthrough_own_guests_next_to_the_demo() {
    let root = keel_boot::image::workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/GUESTS.md")).expect("read docs/GUESTS.md");
    let script = walkthrough_script(&doc).unwrap_or_else(|e| panic!("{e}"));
    let dir = keel_tests::harness_dir().join("walkthrough");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the empty directory");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&dir)
        .env("KEEL", &root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    for line in [
        "[hello16] hello from a flat binary",
        "[hellomb] hello from C, command line \"hellomb.elf from my manifest\", 2944 KiB above 1 MiB",
        "[timekeeper] ",
        "keel: exit status 1",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "no line `{line}`\n{report}"
        );
    }
    // Keel's status 1 (every guest ended) makes `cargo keel run`, and so the script, succeed.
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        stderr.contains(
            "keel-boot: 6 guest(s) [cruncher1, cruncher2, sleeper, timekeeper, hello16, hellomb]"
        ),
        "{report}"
    );
}
