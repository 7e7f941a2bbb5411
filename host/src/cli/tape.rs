//! `rewind tape info|import|export`.

use anyhow::Context as _;
use rewind_host::printable_str;

use crate::TapeCommand;

pub fn tape(command: TapeCommand) -> anyhow::Result<()> {
    use rewind_host::tapes;
    match command {
        TapeCommand::Info { tape, json } => {
            let info = tapes::info(&tape)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&info)?)?;
                return Ok(());
            }
            outln!("tape          {}", tape.display())?;
            outln!("bytes         {}", info.bytes)?;
            match info.seqs {
                Some((first, last)) => {
                    outln!("events        {} (seq {first}..={last})", info.events)?
                }
                None => outln!("events        0")?,
            }
            outln!("malformed     {}", info.malformed)?;
            outln!("with results  {}", info.with_results)?;
            for (i, p) in info.partitions.iter().enumerate() {
                outln!(
                    "{}{}/{}  {} events, offsets {}..={}",
                    if i == 0 {
                        "partitions    "
                    } else {
                        "              "
                    },
                    printable_str(&p.stream),
                    p.partition,
                    p.events,
                    p.first_offset,
                    p.last_offset
                )?;
            }
            if info.runs.is_empty() {
                outln!("runs          none (imported)")?;
            }
            for (i, r) in info.runs.iter().enumerate() {
                let settings =
                    tapes::settings_flags(r.fuel, r.memory_bytes, r.dedup_header.as_deref());
                outln!(
                    "{}from seq {}: module {}, {}, {} events",
                    if i == 0 {
                        "runs          "
                    } else {
                        "              "
                    },
                    r.first_seq,
                    r.module_digest,
                    printable_str(&settings),
                    r.events
                )?;
            }
            Ok(())
        }
        TapeCommand::Import { file, out, stream } => {
            let n = tapes::import(&file, &out, stream.as_deref())?;
            eprintln!("recorded {n} records onto {}", out.display());
            Ok(())
        }
        TapeCommand::Export { tape, out } => {
            let n = match &out {
                Some(path) => {
                    let file = std::fs::File::create_new(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let exported = tapes::export(&tape, &mut w, path);
                    drop(w);
                    // A partial export (a full disk, a damaged tape) is no
                    // result: nothing is left that could pass for one.
                    if exported.is_err() {
                        let _ = std::fs::remove_file(path);
                    }
                    exported?
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    tapes::export(&tape, &mut w, std::path::Path::new("stdout"))?
                }
            };
            if out.is_some() {
                eprintln!("exported {n} records");
            }
            Ok(())
        }
    }
}
