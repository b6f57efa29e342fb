//! Used by scripts/run-demo.sh: fetches Debian's kernel and busybox (cached under
//! target/keel-tests/debian, as for the Linux test), builds the demo's guests next to them and
//! writes the demo manifest with a Linux guest added. Prints the manifest's path and the files'
//! directory on one line each; on failure says why on stderr and exits 1.

use keel_boot::image;
use keel_tests::{debian, harness_dir};

/// The Linux guest the demo gains. Without a terminal to type into (`interactive` false), /init
/// prints a few facts and powers off, so the demo still ends by itself.
fn linux_guest(interactive: bool) -> String {
    let shell = if interactive { "" } else { " KEEL_SHELL=no" };
    format!(
        "# Added by scripts/run-demo.sh: Debian's cloud kernel with a busybox initramfs. Type into\n\
         # its shell on the console (Ctrl-A 1..9 / n moves the keyboard; docs/BOOTING.md).\n\
         [[guest]]\nname = \"linux\"\nkind = \"linux\"\nimage = \"vmlinuz\"\ninitrd = \"initrd\"\n\
         memory = \"192M\"\ncmdline = \"console=ttyS0 cryptomgr.notests{shell}\"\n"
    )
}

/// The demo manifest with the Linux guest as its first guest, so that it has the keyboard.
fn with_linux_first(demo: &str, interactive: bool) -> String {
    let at = demo.find("\n[[guest]]").map_or(demo.len(), |i| i + 1);
    format!(
        "{}{}\n{}",
        &demo[..at],
        linux_guest(interactive).trim_start(),
        &demo[at..]
    )
}

fn main() {
    let interactive = std::env::args().any(|a| a == "--interactive");
    let root = image::workspace_root();
    let result = debian::linux_files(&harness_dir().join("debian")).and_then(|files| {
        image::build_guests(&root, &files.dir, true).map_err(|e| format!("{e:#}"))?;
        let demo = std::fs::read_to_string(root.join(image::DEFAULT_MANIFEST))
            .map_err(|e| format!("{}: {e}", image::DEFAULT_MANIFEST))?;
        let path = harness_dir().join("manifests").join("demo-linux.toml");
        std::fs::create_dir_all(harness_dir().join("manifests"))
            .and_then(|()| std::fs::write(&path, with_linux_first(&demo, interactive)))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, files.dir))
    });
    match result {
        Ok((manifest, dir)) => {
            println!("{}", manifest.display());
            println!("{}", dir.display());
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
