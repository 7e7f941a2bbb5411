//! Compiled components cached on disk, keyed by module digest and engine.
//!
//! Compiling a component with Cranelift takes far longer than loading the
//! machine code back, so the first start compiles and stores the artifact and
//! later starts deserialize it. The key includes the engine's compatibility
//! hash (wasmtime version and every setting that affects code generation),
//! so a host upgrade or a different `--memory-mb` never loads a stale
//! artifact. Writes go through a temporary file and a rename, so a crash
//! never leaves a half-written entry.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components are kept unless `REWIND_CACHE_DIR` says otherwise.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REWIND_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("rewind");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("rewind");
    }
    std::env::temp_dir().join("rewind-cache")
}

/// The cache entry for a module digest (hex) under this engine.
pub fn entry(dir: &Path, engine: &Engine, digest_hex: &str) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{digest_hex}-{:016x}.cwasm", hasher.finish()))
}

/// Loads a cached artifact, or `None` when absent or unusable.
pub fn load(engine: &Engine, path: &Path) -> Option<Component> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: the file was written by `store` from `Component::serialize` of
    // this engine configuration (the name carries its compatibility hash), in
    // a directory only the host writes. wasmtime still checks the header and
    // version and returns an error, not UB, for a truncated or foreign file.
    unsafe { Component::deserialize_file(engine, path) }.ok()
}

/// Stores a compiled artifact; failures only cost the next start a compile.
pub fn store(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let stored = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if stored.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    stored
}
