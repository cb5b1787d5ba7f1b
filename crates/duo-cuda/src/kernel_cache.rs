//! Compiled kernels kept between processes: NVRTC's PTX for one (source, options,
//! architecture, NVRTC version) in a folder, so that a process compiles only what no earlier
//! one did.
//!
//! Why: every process compiles each kernel form it uses at first use, about a second a form
//! on the build machine. A parity run (`duo cuda-check --only decode`) compiles some ninety
//! forms, a benchmark ten, a server's first requests a few: seconds of start-up each time,
//! and a large share of a short call on a lent GPU. The driver caches the machine code it
//! builds from PTX, not NVRTC's work.
//!
//! A file is named by its kernel and a 64-bit FNV-1a hash of everything its PTX depends on.
//! It is written under a temporary name and renamed into place, so a reader never sees half
//! a file; its first line holds the hash of the PTX after it, so a file damaged since (a disk
//! error, an edit) is compiled again and replaced rather than handed to the driver, which
//! would refuse it in every later run. A file that cannot be read or written only means
//! compiling again. The folder keeps
//! the [`KEEP`] files used last (a read touches its file): each build of duo that changes a
//! kernel adds new ones, and a cache that only grows would fill a disk over upgrades.

use std::path::{Path, PathBuf};

/// Files the folder keeps, the most recently used (one build's forms are about a hundred,
/// 14 MB; this keeps a few builds' worth).
pub const KEEP: usize = 512;

/// The folder kept compiled kernels go to: `DUO_KERNEL_CACHE` (empty or `0`: none kept), else
/// `$XDG_CACHE_HOME/duo/kernels`, else `~/.cache/duo/kernels`.
pub fn folder() -> Option<PathBuf> {
    match std::env::var_os("DUO_KERNEL_CACHE") {
        Some(v) if v.is_empty() || v == "0" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("duo").join("kernels")),
    }
}

/// 64-bit FNV-1a over `parts`, each followed by a separator byte, so that moving text from one
/// part to the next changes the key.
pub fn key(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes().iter().chain(std::iter::once(&0x1f)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The file of kernel `name` under `key` in `folder`.
pub fn file(folder: &Path, name: &str, key: u64) -> PathBuf {
    folder.join(format!("{name}-{key:016x}.ptx"))
}

/// The PTX kept in `folder` for `name` and `key`, or else `compile()`'s, which is then kept
/// there (with no folder: `compile()`'s, kept nowhere); the folder keeps its [`KEEP`] most
/// recently used files.
pub fn get_or_compile<E>(
    folder: Option<&Path>,
    name: &str,
    key: u64,
    compile: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    get_or_compile_keeping(folder, name, key, KEEP, compile)
}

/// [`get_or_compile`], keeping the `keep` most recently used files.
pub fn get_or_compile_keeping<E>(
    folder: Option<&Path>,
    name: &str,
    key: u64,
    keep: usize,
    compile: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    let Some(folder) = folder else { return compile() };
    let path = file(folder, name, key);
    if let Some(ptx) = std::fs::read_to_string(&path).ok().and_then(|text| checked(&text).map(str::to_owned)) {
        // Used now: the last file the folder would give up.
        let _ = std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        return Ok(ptx);
    }
    let ptx = compile()?;
    // A new name per process and call, so that writers never share a temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = folder.join(format!(".{name}-{key:016x}.{}.{n}.tmp", std::process::id()));
    let kept = std::fs::create_dir_all(folder)
        .and_then(|()| std::fs::write(&tmp, format!("{}{ptx}", header(&ptx))))
        .and_then(|()| std::fs::rename(&tmp, &path));
    match kept {
        Ok(()) => prune(folder, keep),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!("compiled kernel {name} not kept in {}: {e}", folder.display());
        }
    }
    Ok(ptx)
}

/// A kept file's first line: the hash of the PTX that follows it.
fn header(ptx: &str) -> String {
    format!("// duo kernel cache {:016x}\n", key(&[ptx]))
}

/// The PTX of a kept file's text, where its first line is the header of what follows.
fn checked(text: &str) -> Option<&str> {
    let (first, ptx) = text.split_once('\n')?;
    (format!("{first}\n") == header(ptx)).then_some(ptx)
}

/// Removes all but the `keep` most recently used kept files of `folder` (other files, and
/// files another process removes first, are left alone).
fn prune(folder: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    if kept.len() <= keep {
        return;
    }
    kept.sort();
    for (_, p) in &kept[..kept.len() - keep] {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn temp_folder(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("duo-kernel-cache-{tag}-{}-{nanos}", std::process::id()))
    }

    #[test]
    fn a_key_changes_with_every_part_and_with_where_parts_split() {
        let base = key(&["sm_90", "decode", "-DGROUP=4", "source"]);
        assert_eq!(base, key(&["sm_90", "decode", "-DGROUP=4", "source"]), "the same inputs, the same key");
        for other in [
            key(&["sm_90a", "decode", "-DGROUP=4", "source"]),
            key(&["sm_90", "prefill", "-DGROUP=4", "source"]),
            key(&["sm_90", "decode", "-DGROUP=8", "source"]),
            key(&["sm_90", "decode", "-DGROUP=4", "source "]),
            key(&["sm_90", "decode", "-DGROUP=4s", "ource"]),
            key(&["sm_90", "decode", "-DGROUP=4"]),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_kept_kernel_is_read_back_instead_of_compiled_again() {
        let folder = temp_folder("roundtrip");
        let compiles = Cell::new(0);
        let compile = |text: &str| {
            compiles.set(compiles.get() + 1);
            Ok::<_, String>(text.to_string())
        };
        let first = get_or_compile(Some(&folder), "decode", 7, || compile("// ptx one")).unwrap();
        let again = get_or_compile(Some(&folder), "decode", 7, || compile("// a different compile")).unwrap();
        assert_eq!((first.as_str(), again.as_str(), compiles.get()), ("// ptx one", "// ptx one", 1), "the second call reads the file");
        let other = get_or_compile(Some(&folder), "decode", 8, || compile("// ptx two")).unwrap();
        assert_eq!((other.as_str(), compiles.get()), ("// ptx two", 2), "another key compiles");
        // Only the kept files remain: no temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec![format!("decode-{:016x}.ptx", 7), format!("decode-{:016x}.ptx", 8)]);
        // A kept file damaged since (here: one character of its PTX changed, then one cut
        // off) is compiled again and replaced.
        for damage in [|t: &str| t.replacen("one", "0ne", 1), |t: &str| t[..t.len() - 1].to_string()] {
            let path = file(&folder, "decode", 7);
            std::fs::write(&path, damage(&std::fs::read_to_string(&path).unwrap())).unwrap();
            let before = compiles.get();
            let got = get_or_compile(Some(&folder), "decode", 7, || compile("// ptx one")).unwrap();
            assert_eq!((got.as_str(), compiles.get()), ("// ptx one", before + 1));
            let again = get_or_compile(Some(&folder), "decode", 7, || compile("// not read")).unwrap();
            assert_eq!((again.as_str(), compiles.get()), ("// ptx one", before + 1), "the replacement is read back");
        }
        // A failed compile keeps nothing and says why.
        let failed = get_or_compile(Some(&folder), "decode", 9, || Err::<String, _>("no NVRTC".to_string()));
        assert_eq!(failed, Err("no NVRTC".to_string()));
        assert!(!file(&folder, "decode", 9).exists());
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn the_folder_keeps_the_files_used_last() {
        let folder = temp_folder("prune");
        let hour = std::time::Duration::from_secs(3600);
        let start = std::time::SystemTime::now() - 10 * hour;
        // Three kept kernels, used an hour apart (oldest first), and a file that is not one.
        for k in 0..3u64 {
            get_or_compile_keeping(Some(&folder), "k", k, 3, || Ok::<_, ()>(format!("// {k}"))).unwrap();
            let f = std::fs::File::options().write(true).open(file(&folder, "k", k)).unwrap();
            f.set_modified(start + (k as u32) * hour).unwrap();
        }
        std::fs::write(folder.join("notes.txt"), b"not a kernel").unwrap();
        // Reading kernel 0 makes it the most recent; a fourth kernel then pushes out the
        // least recently used, kernel 1.
        assert_eq!(get_or_compile_keeping(Some(&folder), "k", 0, 3, || Err(())), Ok("// 0".to_string()));
        get_or_compile_keeping(Some(&folder), "k", 3, 3, || Ok::<_, ()>("// 3".to_string())).unwrap();
        let present: Vec<bool> = (0..4).map(|k| file(&folder, "k", k).exists()).collect();
        assert_eq!(present, vec![true, false, true, true]);
        assert!(folder.join("notes.txt").exists(), "other files stay");
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn without_a_folder_or_with_one_that_cannot_be_written_it_compiles_each_time() {
        let compiles = Cell::new(0);
        for _ in 0..2 {
            let got = get_or_compile(None, "ops", 1, || {
                compiles.set(compiles.get() + 1);
                Ok::<_, ()>("// ptx".to_string())
            });
            assert_eq!(got, Ok("// ptx".to_string()));
        }
        assert_eq!(compiles.get(), 2);
        // A folder under a regular file cannot be made: the kernel still comes back.
        let blocker = temp_folder("blocker");
        std::fs::write(&blocker, b"a file").unwrap();
        let under = blocker.join("kernels");
        assert_eq!(get_or_compile(Some(&under), "ops", 1, || Ok::<_, ()>("// ptx".to_string())), Ok("// ptx".to_string()));
        std::fs::remove_file(&blocker).unwrap();
    }
}
