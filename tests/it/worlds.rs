//! Every released version of the processor world runs: a processor built
//! against 0.1.0 (without the SDK, which moved on) is loaded as such and
//! processed under that version's contract.

use rand_core::Rng;
use rewind_host::{Position, Runtime, RuntimeConfig, Seed, World};
use rewind_tests::{config, int, processor, rows, text};

#[test]
fn each_module_is_run_under_the_world_it_was_built_against() {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(rewind_tests::cache_dir()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let world = |name: &str| runtime.load(&processor(name)).unwrap().world();
    assert_eq!(world("legacy-0.1"), World::V0_1);
    assert_eq!(world("payments-v2"), World::V0_2);
    assert_eq!(world("hostile"), World::V0_2);
}

#[test]
fn a_processor_of_world_0_1_runs_under_its_contract() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("legacy.jsonl");
    let lines = [r#"{"n":1}"#, r#"{"reject":true}"#, r#"{"n":3}"#];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let state = dir.path().join("legacy.db");
    let outputs = dir.path().join("out.jsonl");
    let mut cfg = config(&processor("legacy-0.1"), &input, &state);
    cfg.output = Some(outputs.clone());
    struct Logs(std::cell::RefCell<Vec<String>>);
    impl rewind_host::Progress for Logs {
        fn guest_log(&self, position: &Position, line: &str) {
            self.0.borrow_mut().push(format!("{position} {line}"));
        }
    }
    let logs = Logs(Default::default());
    let summary = rewind_host::run(&cfg, &logs).unwrap();
    assert_eq!(summary.consumed, 3);

    // Kept as handed over, with WASI's randomness from the stream's first
    // byte: world 0.1.0 hands no bytes over with the event.
    let seen = rows(
        &state,
        "SELECT stream, partition, offset, payload, random FROM seen ORDER BY offset",
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (row, (offset, line)) in seen.iter().zip([(1, lines[0]), (3, lines[2])]) {
        assert_eq!(text(&row[0]), "legacy.jsonl");
        assert_eq!((int(&row[1]), int(&row[2])), (0, offset));
        assert_eq!(
            row[3],
            rusqlite::types::Value::Blob(line.as_bytes().to_vec())
        );
        let position = Position {
            stream: "legacy.jsonl".into(),
            partition: 0,
            offset,
        };
        let first = position.seed().rng(Seed::WASI).next_u64();
        assert_eq!(int(&row[4]), first as i64, "offset {offset}");
    }

    // Its imports work under their 0.1.0 names: its log lines are shown, a
    // rejection is a dead letter, outputs are written.
    assert_eq!(
        logs.0.into_inner(),
        [
            "legacy.jsonl/0@1 info: kept legacy.jsonl@1",
            "legacy.jsonl/0@3 info: kept legacy.jsonl@3"
        ]
    );
    let dead = rows(&state, "SELECT \"offset\", error_class FROM _rewind_dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (int(&dead[0][0]), text(&dead[0][1])),
        (2, "invalid-input".into())
    );
    let written = std::fs::read_to_string(&outputs).unwrap();
    let echoed: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(echoed.len(), 2, "{written}");
    assert_eq!(echoed[0]["topic"], "echo");
    assert_eq!(echoed[0]["payload"], lines[0]);
    assert_eq!(echoed[1]["payload"], lines[2]);
}
