//! `rewind produce`: re-produce a dump or a tape to Kafka.

use std::process::ExitCode;

use crate::ProduceArgs;

/// `-X key=value` librdkafka settings.
pub fn settings(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("-X {kv:?}: use -X key=value"))
        })
        .collect()
}

pub fn produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(&args.settings)?;
    let config = rewind_host::produce::ProduceConfig {
        brokers: args.brokers,
        topic: args.topic.clone(),
        from: args.from.clone(),
        keep_partitions: args.keep_partitions,
        settings,
    };
    let produced = rewind_host::produce::produce(&config)?;
    for skipped in &produced.skipped {
        eprintln!("skipped {}: {}", skipped.at, skipped.reason);
    }
    eprintln!(
        "produced {} records from {} to {}{}",
        produced.records,
        args.from.display(),
        args.topic,
        if produced.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped {} invalid records", produced.skipped.len())
        }
    );
    Ok(if produced.skipped.is_empty() || args.skip_invalid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
