//! `--disk path=FILE|dir=DIR[,readonly=on][,snapshot=on][,bdf=00:DD.0][,serial=ID]
//! [,cache=volatile|host]`: the virtio-blk disks a VM gets, the read-only ext4 image
//! built from a host directory at start (`dir=`), so a CI job hands its payload to the
//! guest without building images by hand, and private copies (`snapshot=on`) that
//! leave the original untouched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use devices::pci::Bdf;
use devices::virtio::disk::CacheMode;

/// Where the disk's contents come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// A raw image file.
    File(PathBuf),
    /// A host directory, copied into a fresh ext4 image at start (read-only).
    Dir(PathBuf),
}

/// One `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The contents.
    pub source: DiskSource,
    /// The guest may not write.
    pub readonly: bool,
    /// Requested PCI address.
    pub bdf: Option<Bdf>,
    /// GET_ID serial (at most 20 bytes).
    pub serial: Option<String>,
    /// Write cache.
    pub cache: CacheMode,
    /// The guest works on a private copy of the file, removed at exit.
    pub snapshot: bool,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut source = None;
        let mut readonly = false;
        let mut bdf = None;
        let mut serial = None;
        let mut cache = CacheMode::Volatile;
        let mut snapshot = false;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!(
                    "'{part}' is not key=value (path=FILE or dir=DIR, readonly=on, bdf=00:DD.0, serial=ID, cache=volatile|host)"
                ));
            };
            match k {
                "path" | "dir" if source.is_some() => {
                    return Err("give one of path= and dir=".into())
                }
                "path" if !v.is_empty() => source = Some(DiskSource::File(v.into())),
                "dir" if !v.is_empty() => source = Some(DiskSource::Dir(v.into())),
                "readonly" | "ro" => {
                    readonly = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(format!("readonly={v}: on or off")),
                    }
                }
                "bdf" => {
                    let b: Bdf = v.parse().map_err(|e| format!("bdf: {e}"))?;
                    if b.bus != 0 || b.function != 0 || b.device == 0 {
                        return Err(format!(
                            "bdf={v}: use 00:DD.0 with DD between 01 and 1f (00:00.0 is the host bridge)"
                        ));
                    }
                    bdf = Some(b);
                }
                "serial" => {
                    if v.len() > 20 || !v.bytes().all(|c| c.is_ascii_graphic()) {
                        return Err(format!("serial={v}: at most 20 printable ASCII characters"));
                    }
                    serial = Some(v.to_string());
                }
                "snapshot" => {
                    snapshot = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(format!("snapshot={v}: on or off")),
                    }
                }
                "cache" => {
                    cache = match v {
                        "volatile" => CacheMode::Volatile,
                        "host" => CacheMode::Host,
                        _ => return Err(format!("cache={v}: volatile or host")),
                    }
                }
                _ => {
                    return Err(format!(
                    "unknown disk option '{k}' (path, dir, readonly, snapshot, bdf, serial, cache)"
                ))
                }
            }
        }
        let source = source.ok_or("a disk needs path=FILE or dir=DIR")?;
        if matches!(source, DiskSource::Dir(_)) {
            if !readonly && s.contains("readonly=off") {
                return Err("dir= disks are read-only".into());
            }
            readonly = true;
        }
        Ok(Self {
            source,
            readonly,
            bdf,
            serial,
            cache,
            snapshot,
        })
    }
}

/// Errors of building a `dir=` image.
#[derive(Debug, thiserror::Error)]
pub enum DirImageError {
    /// The directory cannot be read.
    #[error("disk dir={path}: {why}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// mkfs.ext4 failed or is missing.
    #[error("disk dir={path}: mkfs.ext4 -d failed: {why}")]
    Mkfs {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Bytes below `dir` (files and directory entries), without following symlinks.
fn tree_size(dir: &Path, depth: u32) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    if depth > 64 {
        return Ok((bytes, inodes));
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        inodes += 1;
        if m.is_dir() {
            let (b, i) = tree_size(&e.path(), depth + 1)?;
            bytes += b;
            inodes += i;
        } else {
            bytes += m.len().next_multiple_of(4096);
        }
    }
    Ok((bytes, inodes))
}

/// A read-only ext4 image of `dir` in a temporary file that is removed when dropped.
pub struct DirImage {
    /// The image.
    pub path: PathBuf,
}

impl Drop for DirImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn temp_image_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "faultvisor-{what}-{}-{}.img",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ))
}

/// A private copy of `file` in the temporary directory (`snapshot=on`), removed when
/// dropped.
pub fn snapshot_image(file: &Path) -> Result<DirImage, String> {
    let tmp = temp_image_path("snapshot");
    let image = DirImage { path: tmp.clone() };
    std::fs::copy(file, &tmp).map_err(|e| {
        format!(
            "disk {}: cannot make its snapshot copy in {}: {e}",
            file.display(),
            tmp.display()
        )
    })?;
    Ok(image)
}

/// Builds the ext4 image of `dir` (`mkfs.ext4 -d`, as an unprivileged user).
pub fn build_dir_image(dir: &Path) -> Result<DirImage, DirImageError> {
    let err = |why: String| DirImageError::Dir {
        path: dir.into(),
        why,
    };
    if !dir.is_dir() {
        return Err(err("not a directory".into()));
    }
    let (bytes, inodes) = tree_size(dir, 0).map_err(|e| err(e.to_string()))?;
    // Room for metadata and the journal: a third more, plus 16 MiB, whole MiB.
    let size = (bytes + bytes / 3 + inodes * 512 + (16 << 20)).next_multiple_of(1 << 20);
    let tmp = temp_image_path("dir");
    let image = DirImage { path: tmp.clone() };
    let f = std::fs::File::create(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    f.set_len(size)
        .map_err(|e| err(format!("cannot size {}: {e}", tmp.display())))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "fv-dir", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(&tmp)
        .output()
        .map_err(|e| DirImageError::Mkfs {
            path: dir.into(),
            why: format!("{e} (install e2fsprogs)"),
        })?;
    if !out.status.success() {
        return Err(DirImageError::Mkfs {
            path: dir.into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    log::info!(
        "disk dir={}: built a {} MiB read-only ext4 image",
        dir.display(),
        size >> 20
    );
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d: DiskSpec = "path=/tmp/a.img".parse().expect("path");
        assert_eq!(d.source, DiskSource::File("/tmp/a.img".into()));
        assert!(!d.readonly);
        assert_eq!(d.cache, CacheMode::Volatile);
        let d: DiskSpec = "path=x,readonly=on,bdf=00:06.0,serial=ABC,cache=host"
            .parse()
            .expect("all");
        assert!(d.readonly && d.bdf == Some(Bdf::new(6)) && d.cache == CacheMode::Host);
        assert_eq!(d.serial.as_deref(), Some("ABC"));
        assert!(!d.snapshot);
        let d: DiskSpec = "path=x,snapshot=on".parse().expect("snapshot");
        assert!(d.snapshot);
        let d: DiskSpec = "dir=/tmp".parse().expect("dir");
        assert!(d.readonly, "dir= disks are read-only");
        for (bad, msg) in [
            ("", "needs path=FILE or dir=DIR"),
            ("readonly=on", "needs path=FILE or dir=DIR"),
            ("path=a,dir=b", "one of path= and dir="),
            ("path", "is not key=value"),
            ("path=a,speed=3", "unknown disk option 'speed'"),
            ("path=a,readonly=maybe", "on or off"),
            ("path=a,cache=none", "volatile or host"),
            ("path=a,serial=012345678901234567890", "at most 20"),
            ("path=a,bdf=zz", "bdf:"),
            ("dir=/tmp,readonly=off", "read-only"),
        ] {
            let e = bad.parse::<DiskSpec>().expect_err(bad);
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn dir_image_is_an_ext4_filesystem() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("SKIP: mkfs.ext4 missing (install e2fsprogs)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("fv-dirimg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/payload.sh"), b"echo hello\n").expect("write");
        let img = build_dir_image(&dir).expect("image");
        let bytes = std::fs::read(&img.path).expect("read");
        // The ext4 superblock magic 0xEF53 at byte 1024 + 0x38.
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        let p = img.path.clone();
        drop(img);
        assert!(!p.exists(), "removed when dropped");
        std::fs::remove_dir_all(&dir).expect("rm");
        assert!(matches!(
            build_dir_image(Path::new("/nonexistent-dir")),
            Err(DirImageError::Dir { .. })
        ));
    }
}
