//! The README's "write your first processor": its code is `processors/counter`
//! as printed, and the processor does what the README says it does.

use std::collections::BTreeMap;

use rewind_tests::{int, rewind_bin, rewind_run, root, rows, text};

/// The README's code blocks that open with a path comment
/// (`# processors/…` or `// processors/…`): (path, the lines after it).
fn printed_files() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut files = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") || line == "```" {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let Some((first, rest)) = block.split_first() else {
            continue;
        };
        let path = first
            .strip_prefix("# ")
            .or_else(|| first.strip_prefix("// "))
            .filter(|p| p.starts_with("processors/"));
        if let Some(path) = path {
            files.push((
                path.to_owned(),
                rest.iter().map(|l| format!("{l}\n")).collect(),
            ));
        }
    }
    files
}

#[test]
fn the_readme_processor_is_processors_counter_as_printed() {
    let files = printed_files();
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "processors/counter/Cargo.toml",
            "processors/counter/src/lib.rs"
        ]
    );
    for (path, printed) in files {
        let on_disk = std::fs::read_to_string(root().join(&path)).unwrap();
        assert_eq!(
            printed, on_disk,
            "README.md prints {path} otherwise than it is: change both together"
        );
    }
}

/// Counts per user, an output per view with the running count, and a dead
/// letter for what cannot be a view, as the README's comments say.
#[test]
fn the_readme_processor_counts_views_and_dead_letters_bad_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("views.jsonl");
    let users = ["ann", "bob", "cy\u{e9}", "dee \"d\""];
    let mut lines = Vec::new();
    let mut model: BTreeMap<&str, i64> = BTreeMap::new();
    let mut expected_outputs = Vec::new();
    let mut expected_dead = Vec::new();
    for i in 0..200usize {
        let offset = lines.len() as i64 + 1;
        match i % 23 {
            7 => {
                lines.push("{\"user\":".to_owned());
                expected_dead.push((offset, "malformed"));
            }
            11 => {
                lines.push("{\"name\":\"ann\"}".to_owned());
                expected_dead.push((offset, "invalid-input"));
            }
            _ => {
                let user = users[(i * 7 + i / 5) % users.len()];
                lines.push(serde_json::json!({ "user": user }).to_string());
                let n = model.entry(user).or_default();
                *n += 1;
                expected_outputs.push((
                    user.to_owned(),
                    serde_json::json!({ "user": user, "views": *n }),
                ));
            }
        }
    }
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let state = dir.path().join("views.db");
    let output = dir.path().join("counts.jsonl");
    let out = rewind_run("counter", &input, &state)
        .args(["--output".as_ref(), output.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let counted: BTreeMap<String, i64> = rows(&state, "SELECT user, n FROM views")
        .iter()
        .map(|r| (text(&r[0]), int(&r[1])))
        .collect();
    let model: BTreeMap<String, i64> = model.iter().map(|(u, n)| (u.to_string(), *n)).collect();
    assert_eq!(counted, model);

    let outputs: Vec<(String, serde_json::Value)> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|line| {
            let envelope: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(envelope["topic"], "view_counts");
            let payload = envelope["payload"].as_str().unwrap();
            (
                envelope["key"].as_str().unwrap().to_owned(),
                serde_json::from_str(payload).unwrap(),
            )
        })
        .collect();
    assert_eq!(outputs, expected_outputs);

    let out = std::process::Command::new(rewind_bin())
        .args(["dlq", "list", "--json", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dead: Vec<(i64, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let letter: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                letter["offset"].as_i64().unwrap(),
                letter["error_class"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected_dead: Vec<(i64, String)> = expected_dead
        .into_iter()
        .map(|(offset, class)| (offset, class.to_owned()))
        .collect();
    assert_eq!(dead, expected_dead);
}
