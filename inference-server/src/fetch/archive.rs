//! Unpacking `.tar` and `.tar.gz` model archives, refusing entries that would land outside the
//! output directory.
//!
//! Entries are unpacked into a staging directory inside the output directory first and moved
//! into place only when the whole archive was read and found safe, so a rejected or broken
//! archive leaves nothing behind.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::error::FetchError;
use super::{Fetched, UNPACKING};

/// How the tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// Unpacks the archive at `archive` into `out`. `source` names it in errors.
pub fn unpack(
    archive: &Path,
    out: &Path,
    compression: Compression,
    source: &str,
) -> Result<Fetched, FetchError> {
    let staging = out.join(UNPACKING);
    remove_if_present(&staging)?;
    std::fs::create_dir(&staging).map_err(FetchError::io("create", &staging))?;
    let result = unpack_into(archive, &staging, compression, source)
        .and_then(|fetched| move_into_place(&staging, out).map(|()| fetched));
    // Whatever happened, the staging directory goes; an error removing it must not hide the
    // error that matters.
    let cleanup = remove_if_present(&staging);
    let fetched = result?;
    cleanup?;
    Ok(fetched)
}

fn unpack_into(
    archive: &Path,
    staging: &Path,
    compression: Compression,
    source: &str,
) -> Result<Fetched, FetchError> {
    let file = File::open(archive).map_err(FetchError::io("open", archive))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(MultiGzDecoder::new(BufReader::new(file))),
    };
    let archive_error = |source_err: std::io::Error| FetchError::Archive {
        url: source.to_owned(),
        source: source_err,
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    let mut fetched = Fetched::default();
    for entry in tar.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let path = entry.path().map_err(archive_error)?.into_owned();
        let shown = path.display().to_string();
        let unsafe_entry = |reason| FetchError::UnsafeArchiveEntry {
            entry: shown.clone(),
            reason,
        };
        let entry_type = entry.header().entry_type();
        match entry_type {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(archive_error)?
                    .ok_or_else(|| unsafe_entry("a link without a target"))?
                    .into_owned();
                let inside = if entry_type == EntryType::Symlink {
                    // Relative to the link's own directory, and may climb within the tree.
                    let base = path.parent().unwrap_or(Path::new(""));
                    stays_inside(&base.join(&target))
                } else {
                    // Hard links name a path from the archive's root.
                    is_plain_relative(&target)
                };
                if !inside {
                    return Err(unsafe_entry("a link pointing outside the output directory"));
                }
            }
            EntryType::XGlobalHeader | EntryType::XHeader => continue,
            _ => return Err(unsafe_entry("a device, FIFO or unknown entry type")),
        }
        if !is_plain_relative(&path) {
            return Err(unsafe_entry("an absolute path or one with `..`"));
        }
        if path.components().all(|c| c == Component::CurDir) {
            continue;
        }
        let size = entry.header().size().map_err(archive_error)?;
        let unpacked = entry.unpack_in(staging).map_err(archive_error)?;
        if !unpacked {
            return Err(unsafe_entry("a path that leaves the output directory"));
        }
        if entry_type != EntryType::Directory {
            fetched.files += 1;
            fetched.bytes += size;
        }
    }
    Ok(fetched)
}

/// Whether a path is relative and has no `..`: what an archive entry's own path must be.
fn is_plain_relative(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Whether a relative path, read lexically, never climbs above where it starts: what a symbolic
/// link's target (joined to the link's directory) must do.
fn stays_inside(path: &Path) -> bool {
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Moves every top-level entry of `staging` into `out`, replacing what has the same name.
fn move_into_place(staging: &Path, out: &Path) -> Result<(), FetchError> {
    let entries = std::fs::read_dir(staging).map_err(FetchError::io("read", staging))?;
    for entry in entries {
        let entry = entry.map_err(FetchError::io("read", staging))?;
        let target = out.join(entry.file_name());
        remove_if_present(&target)?;
        std::fs::rename(entry.path(), &target)
            .map_err(FetchError::io("move into place", &target))?;
    }
    Ok(())
}

/// Removes a file, link or directory tree; a missing one is fine.
pub fn remove_if_present(path: &Path) -> Result<(), FetchError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => Err(err),
    };
    result.map_err(FetchError::io("remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    #[test]
    fn relative_paths_stay_inside_and_climbing_ones_do_not() {
        assert!(stays_inside(Path::new("model/config.json")));
        assert!(stays_inside(Path::new("./model/../x")));
        assert!(!stays_inside(Path::new("../x")));
        assert!(!stays_inside(Path::new("a/../../x")));
        assert!(!stays_inside(Path::new("/etc/passwd")));
        assert!(is_plain_relative(Path::new("./model/config.json")));
        assert!(!is_plain_relative(Path::new("model/../x")));
        assert!(!is_plain_relative(Path::new("/x")));
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("llama-fetch-archive-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tar holding `model/config.json` and a symbolic link `model/link` to `target`.
    fn tar_with_link(path: &Path, target: &str) {
        let file = File::create(path).expect("create tar");
        let mut builder = tar::Builder::new(file);
        let body = b"{}";
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "model/config.json", &body[..])
            .expect("file entry");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "model/link", target)
            .expect("link entry");
        builder.finish().expect("finish tar");
    }

    #[test]
    fn links_inside_the_tree_unpack() {
        let dir = TempDir::new("inside");
        let (tar, out) = (dir.0.join("m.tar"), dir.0.join("out"));
        std::fs::create_dir(&out).expect("out");
        tar_with_link(&tar, "./config.json");
        let fetched = unpack(&tar, &out, Compression::None, "m.tar").expect("unpacks");
        assert_eq!(fetched.files, 2);
        assert_eq!(
            std::fs::read_to_string(out.join("model/link")).expect("through the link"),
            "{}"
        );
        assert!(!out.join(UNPACKING).exists());
    }

    #[test]
    fn links_pointing_outside_are_refused_and_nothing_is_left() {
        let dir = TempDir::new("outside");
        let (tar, out) = (dir.0.join("m.tar"), dir.0.join("out"));
        std::fs::create_dir(&out).expect("out");
        for target in ["../../etc/passwd", "/etc/passwd"] {
            tar_with_link(&tar, target);
            let err = unpack(&tar, &out, Compression::None, "m.tar").expect_err(target);
            assert!(
                matches!(err, FetchError::UnsafeArchiveEntry { ref entry, .. } if entry == "model/link"),
                "{target}: {err}"
            );
            let left: Vec<_> = std::fs::read_dir(&out).expect("read out").collect();
            assert!(left.is_empty(), "{target}: left {left:?}");
        }
    }
}
