//! Repository hygiene checked like any other behaviour: every Rust file says
//! what lives in it on its first line, and no build output is committed.

use std::path::Path;

use rewind_tests::root;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc_line() {
    let mut files = Vec::new();
    rust_files(&root(), &mut files);
    assert!(files.len() > 20, "found only {} Rust files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading `//!` line: {missing:?}"
    );
}

#[test]
fn no_wasm_or_database_is_committed() {
    let listed = std::process::Command::new("git")
        .arg("ls-files")
        .current_dir(root())
        .output();
    // Outside a git checkout (a source tarball) there is nothing to check.
    let Ok(listed) = listed else { return };
    let files = String::from_utf8_lossy(&listed.stdout);
    let offending: Vec<&str> = files
        .lines()
        .filter(|f| {
            [".wasm", ".cwasm", ".db", ".db-wal", ".tape"]
                .iter()
                .any(|ext| f.ends_with(ext))
        })
        .collect();
    assert!(
        offending.is_empty(),
        "build outputs or databases are committed: {offending:?}"
    );
}
