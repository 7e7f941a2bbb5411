//! The implementations of `rewind`'s commands (their arguments live in
//! `main.rs`).

/// `println!` that returns an error where `println!` would panic: stdout
/// redirected to a full disk, say.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)
    }};
}

/// `print!` that returns an error where `print!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)
    }};
}

pub mod compare;
pub mod kafka;
pub mod run;
pub mod state;
pub mod tape;

/// `--sql-stall-secs`: 0 means never.
fn stall_limit(secs: u64) -> Option<std::time::Duration> {
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

/// A progress bar on stderr drawn with `template` (hidden with `--quiet`,
/// and by indicatif when stderr is not a terminal).
pub fn progress_bar(quiet: bool, template: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let target = if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(ProgressStyle::with_template(template).expect("the template is valid"));
    bar
}

/// A failed write to stdout, for the one-line error.
pub fn stdout_error(error: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("could not write to stdout: {error}")
}

/// Says that a compiled processor could not be cached (not an error: it
/// only costs the next start a compile).
pub fn warn_uncached(error: &str) {
    eprintln!(
        "rewind: warning: could not cache the compiled processor ({error}); every start \
         compiles it again (see --cache-dir)"
    );
}

/// Writes a report (or an approved baseline) whole or not at all: into a
/// new file beside `path`, then renamed over it. A write that fails (a full
/// disk) leaves no truncated report, and the file it would have replaced
/// (the approved baseline, with `--accept`) as it was. Anything but a
/// regular file (`/dev/stdout`, a pipe, a symbolic link) is written in
/// place.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    write_file_with(path, |out| out.write_all(bytes).map_err(Into::into))
}

/// [`write_file`] with what `write` writes (a report streamed as it is made).
pub fn write_file_with(
    path: &std::path::Path,
    write: impl FnOnce(&mut std::fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write as _;

    use anyhow::Context as _;
    let regular = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.is_file(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let into = |target: &std::path::Path| -> anyhow::Result<()> {
        let mut file = std::fs::File::create(target)?;
        write(&mut file)?;
        file.flush()?;
        Ok(())
    };
    if !regular {
        return into(path).with_context(|| format!("cannot write {}", path.display()));
    }
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: not a file name", path.display()))?;
    let mut temporary = std::ffi::OsString::from(".");
    temporary.push(name);
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary);
    let written = into(&temporary).and_then(|()| Ok(std::fs::rename(&temporary, path)?));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// Set once a stop handler of [`discard_on_interrupt`] has begun: it ends
/// the process when done.
static DISCARDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits for the end of the process while a stop handler discards a
/// command's scratch (the command may fail meanwhile, as its files go).
pub fn wait_if_discarding() {
    while DISCARDING.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// On Ctrl-C or SIGTERM, removes `scratch` (files, or directories with
/// what they hold) and exits with 130: for commands whose scratch states
/// are worth nothing unfinished (`replay`, `verify`), which would
/// otherwise leave them in the temporary directory.
pub fn discard_on_interrupt(
    command: &'static str,
    scratch: Vec<std::path::PathBuf>,
) -> anyhow::Result<()> {
    on_stop(move || {
        DISCARDING.store(true, std::sync::atomic::Ordering::SeqCst);
        // The run goes on while its scratch goes, and may make a file after
        // it (SQLite's WAL index as a state opens, a side's next file in a
        // directory): sweep again until a sweep, a moment after the one
        // before, finds nothing.
        for _ in 0..5 {
            let mut found = false;
            for path in &scratch {
                if path.is_dir() {
                    found = true;
                    let _ = std::fs::remove_dir_all(path);
                } else if path.exists() {
                    found = true;
                    let _ = std::fs::remove_file(path);
                }
            }
            if !found {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("rewind: {command} interrupted: nothing reported");
        std::process::exit(130);
    })
}

/// Runs `handler` (on a thread of its own) on Ctrl-C, SIGTERM or SIGHUP,
/// except for those of them ignored when rewind started (`nohup`, a
/// script's background job): they stay ignored, as Unix tools leave them.
pub fn on_stop(handler: impl FnMut() + Send + 'static) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    let ignored: Vec<libc::c_int> = signals
        .into_iter()
        .filter(|&signal| {
            // SAFETY: reads the disposition only (a null new action).
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_IGN
            }
        })
        .collect();
    ctrlc::set_handler(handler).context("cannot install the Ctrl-C handler")?;
    for signal in ignored {
        // SAFETY: restores the inherited disposition of a signal.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    Ok(())
}
