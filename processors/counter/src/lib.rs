//! Counts page views per user.
use rewind_guest::{Event, Processor, Result, emit_json, sql};

struct Counter;

#[derive(serde::Deserialize)]
struct View {
    user: String,
}

impl Processor for Counter {
    fn init() -> Result<()> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS views (user TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: Event) -> Result<()> {
        let view: View = event.json()?; // a bad payload becomes a dead letter
        sql::execute(
            "INSERT INTO views VALUES (?1, 1) ON CONFLICT (user) DO UPDATE SET n = n + 1",
            &[&view.user],
        )?;
        let n: i64 = sql::query_row("SELECT n FROM views WHERE user = ?1", &[&view.user])?
            .expect("just written")
            .get("n")?;
        emit_json(
            "view_counts",
            &view.user,
            &serde_json::json!({ "user": view.user, "views": n }),
        )
    }
}

rewind_guest::export!(Counter);
