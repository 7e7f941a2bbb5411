//! The outbox's pages: partial acknowledgements survive a restart, and a
//! state DB of the previous format keeps its pending outputs.

use rewind_host::{Header, OutboxRow, Output, StateDb};

fn output(seq: u64, n: u32) -> OutboxRow {
    OutboxRow {
        seq,
        n,
        id: format!("orders/0@{seq}/{n}"),
        output: Output {
            stream: "payments".into(),
            key: Some(format!("k{seq}").into_bytes()),
            payload: (!seq.is_multiple_of(5)).then(|| format!("{{\"seq\":{seq}}}").into_bytes()),
            headers: vec![Header {
                name: "n".into(),
                value: (n > 0).then(|| vec![0xff, n as u8]),
            }],
        },
        timestamp_ms: Some(seq as i64),
    }
}

#[test]
fn outputs_acknowledged_mid_page_are_not_sent_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let all: Vec<OutboxRow> = (0..40)
        .flat_map(|seq| [output(seq, 0), output(seq, 1)])
        .collect();
    {
        let db = StateDb::open(&path).unwrap();
        db.begin().unwrap();
        for row in &all {
            db.queue_outbox(row).unwrap();
        }
        db.commit().unwrap();
        // A transaction rolled back takes its queued outputs with it.
        db.begin().unwrap();
        db.queue_outbox(&output(99, 0)).unwrap();
        db.rollback().unwrap();
        assert_eq!(db.pending_outbox(None, usize::MAX).unwrap(), all);
        // The sink made the first 31 durable: in the middle of the one page.
        db.ack_outbox((15, 0), None).unwrap();
        assert_eq!(db.summary().unwrap().outbox_pending, 49);
    }
    let db = StateDb::open(&path).unwrap();
    assert_eq!(db.pending_outbox(None, usize::MAX).unwrap(), all[31..]);
    assert_eq!(db.pending_outbox(Some((38, 1)), 1).unwrap(), all[78..]);
    db.ack_outbox((39, 1), None).unwrap();
    assert!(db.pending_outbox(None, usize::MAX).unwrap().is_empty());
    assert_eq!(db.summary().unwrap().outbox_pending, 0);
    let pages: i64 =
        rewind_tests::int(&rewind_tests::rows(&path, "SELECT count(*) FROM _rewind_outbox")[0][0]);
    assert_eq!(pages, 0, "delivered pages are deleted");
}

/// Makes the tables `rewind-state-2` wrote (an outbox row per output,
/// headers as JSON), with its format recorded unless `killed` (a crash while
/// it was being created), then runs `rows` (SQL filling the outbox).
fn format_2_db(path: &std::path::Path, killed: bool, rows: &str) {
    let format = if killed {
        ""
    } else {
        "INSERT INTO _rewind_meta VALUES ('format', 'rewind-state-2');"
    };
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(&format!(
            "CREATE TABLE _rewind_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
             {format}
             CREATE TABLE _rewind_outbox (slot INTEGER PRIMARY KEY, id TEXT NOT NULL,
                 stream TEXT NOT NULL, key BLOB, payload BLOB, headers TEXT NOT NULL,
                 timestamp_ms INTEGER);
             {rows}"
        ))
        .unwrap();
}

#[test]
fn a_state_db_of_the_previous_format_keeps_its_pending_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    format_2_db(
        &path,
        false,
        "INSERT INTO _rewind_outbox VALUES
             (65536, 'in/0@1/0', 'out', X'6b31', X'7b7d', '[[\"a\",\"x\"],[\"b\",null],[\"c\",{\"hex\":\"ff00\"}]]', 5),
             (131073, 'in/0@2/1', 'out', NULL, NULL, '[]', NULL);",
    );

    let db = StateDb::open(&path).unwrap();
    let pending = db.pending_outbox(None, usize::MAX).unwrap();
    let header = |name: &str, value: Option<&[u8]>| Header {
        name: name.into(),
        value: value.map(<[u8]>::to_vec),
    };
    assert_eq!(
        pending,
        [
            OutboxRow {
                seq: 1,
                n: 0,
                id: "in/0@1/0".into(),
                output: Output {
                    stream: "out".into(),
                    key: Some(b"k1".to_vec()),
                    payload: Some(b"{}".to_vec()),
                    headers: vec![
                        header("a", Some(b"x")),
                        header("b", None),
                        header("c", Some(&[0xff, 0])),
                    ],
                },
                timestamp_ms: Some(5),
            },
            OutboxRow {
                seq: 2,
                n: 1,
                id: "in/0@2/1".into(),
                output: Output {
                    stream: "out".into(),
                    key: None,
                    payload: None,
                    headers: vec![],
                },
                timestamp_ms: None,
            },
        ]
    );
    assert_eq!(db.summary().unwrap().outbox_pending, 2);
    drop(db);
    let format = rewind_tests::rows(&path, "SELECT value FROM _rewind_meta WHERE key = 'format'");
    assert_eq!(rewind_tests::text(&format[0][0]), rewind_host::STATE_FORMAT);
}

#[test]
fn a_dead_letter_output_as_long_as_the_longest_line_fits_in_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let db = StateDb::open(&path).unwrap();
    let mut long = output(7, 0);
    // A line cut at the limit is dead-lettered with its bytes as the payload.
    long.output.payload = Some(vec![b'x'; rewind_host::MAX_LINE]);
    db.begin().unwrap();
    db.queue_outbox(&output(6, 0)).unwrap();
    db.queue_outbox(&long).unwrap();
    db.queue_outbox(&output(8, 0)).unwrap();
    db.commit().unwrap();
    let pending = db.pending_outbox(None, usize::MAX).unwrap();
    assert_eq!(pending, [output(6, 0), long, output(8, 0)]);
}

#[test]
fn a_large_outbox_of_the_previous_format_migrates_into_several_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    format_2_db(
        &path,
        false,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
         INSERT INTO _rewind_outbox
             SELECT i * 65536, 'in/0@' || i || '/0', 'out', NULL, zeroblob(600), '[]', i FROM n;",
    );

    let db = StateDb::open(&path).unwrap();
    let pending = db.pending_outbox(None, usize::MAX).unwrap();
    assert_eq!(pending.len(), 3000);
    for (i, row) in pending.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(
            (row.seq, row.n, row.timestamp_ms),
            (seq, 0, Some(seq as i64))
        );
        assert_eq!(row.id, format!("in/0@{seq}/0"));
        assert_eq!(row.output.payload.as_deref(), Some(&[0u8; 600][..]));
    }
    assert_eq!(db.summary().unwrap().outbox_pending, 3000);
    let pages =
        rewind_tests::int(&rewind_tests::rows(&path, "SELECT count(*) FROM _rewind_outbox")[0][0]);
    assert!(pages >= 2, "{pages} pages");
}

#[test]
fn a_previous_format_db_killed_before_its_format_was_written_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // What `rewind-state-2` had written when killed: its tables, no format.
    format_2_db(&path, true, "");
    let db = StateDb::open(&path).unwrap();
    db.begin().unwrap();
    db.queue_outbox(&output(1, 0)).unwrap();
    db.commit().unwrap();
    assert_eq!(db.pending_outbox(None, usize::MAX).unwrap(), [output(1, 0)]);
    let format = rewind_tests::rows(&path, "SELECT value FROM _rewind_meta WHERE key = 'format'");
    assert_eq!(rewind_tests::text(&format[0][0]), rewind_host::STATE_FORMAT);
}
