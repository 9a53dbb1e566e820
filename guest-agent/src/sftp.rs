//! The `sftp` subsystem: an SFTP server on stdin/stdout, run as the build user in a process of
//! its own (like OpenSSH's sftp-server), so every file it makes belongs to that user.

use std::collections::HashMap;
use std::fs::{self, File as FsFile, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::sync::oneshot;

/// Serves SFTP on this process's stdin and stdout until the client goes away.
pub async fn serve() {
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let stream = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    russh_sftp::server::run(stream, Sftp::new(done_tx)).await;
    // The server task drops the handler (and with it the sender) when the stream ends.
    let _ = done_rx.await;
}

enum Open {
    File(FsFile),
    /// A directory's entries, handed out in one READDIR; then EOF.
    Dir(Option<Vec<File>>),
}

struct Sftp {
    handles: HashMap<String, Open>,
    next_handle: u64,
    _done: oneshot::Sender<()>,
}

/// Upper bound of one READ reply; clients ask for 32-256 KiB.
const MAX_READ: u32 = 256 * 1024;
const MAX_HANDLES: usize = 256;

fn status_of(e: &io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn entry(name: String, meta: &fs::Metadata) -> File {
    let attrs = FileAttributes::from(meta);
    let longname = format!(
        "{} 1 {} {} {} {name}",
        mode_string(meta),
        meta.uid(),
        meta.gid(),
        meta.len()
    );
    File {
        filename: name,
        longname,
        attrs,
    }
}

/// `drwxr-xr-x`, as `ls -l` shows a mode.
fn mode_string(meta: &fs::Metadata) -> String {
    let kind = if meta.is_dir() {
        'd'
    } else if meta.file_type().is_symlink() {
        'l'
    } else {
        '-'
    };
    let mode = meta.mode();
    let bits = (0..9).rev().map(|i| {
        if mode & (1 << i) != 0 {
            b"xwr"[i % 3] as char
        } else {
            '-'
        }
    });
    std::iter::once(kind).chain(bits).collect()
}

/// Applies the attributes a client may set: permissions, owner, times, size.
fn apply_attrs(path: &Path, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let times = fs::FileTimes::new()
            .set_accessed(std::time::UNIX_EPOCH + std::time::Duration::from_secs(atime.into()))
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.into()));
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_times(times)?;
    }
    Ok(())
}

impl Sftp {
    fn new(done: oneshot::Sender<()>) -> Self {
        Sftp {
            handles: HashMap::new(),
            next_handle: 0,
            _done: done,
        }
    }

    fn add(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        self.next_handle += 1;
        let handle = self.next_handle.to_string();
        self.handles.insert(handle.clone(), open);
        Ok(handle)
    }

    fn file(&self, handle: &str) -> Result<&FsFile, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusCode::Failure.with_message("no such file handle")),
        }
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let read_only = pflags.contains(OpenFlags::READ) && !pflags.contains(OpenFlags::WRITE);
        let mut options: OpenOptions = pflags.into();
        options.mode(attrs.permissions.map_or(0o644, |m| m & 0o7777));
        if read_only {
            // What the worker reads (artifacts) is a regular file: not a link to elsewhere, and
            // a FIFO must not hold the open until some writer comes.
            options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        }
        let file = options.open(&filename).map_err(|e| status_of(&e))?;
        if read_only && !file.metadata().map_err(|e| status_of(&e))?.is_file() {
            return Err(StatusCode::Failure
                .with_message(format!("{filename} is not a regular file: it is not read")));
        }
        let handle = self.add(Open::File(file))?;
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let mut data = vec![0; len.min(MAX_READ) as usize];
        let n = file.read_at(&mut data, offset).map_err(|e| status_of(&e))?;
        if n == 0 && !data.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = fs::symlink_metadata(&path).map_err(|e| status_of(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = self.file(&handle)?.metadata().map_err(|e| status_of(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        apply_attrs(Path::new(&path), &attrs).map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        let apply = || -> io::Result<()> {
            if let Some(size) = attrs.size {
                file.set_len(size)?;
            }
            if let Some(mode) = attrs.permissions {
                file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
            }
            Ok(())
        };
        apply().map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&path).map_err(|e| status_of(&e))? {
            let dirent = dirent.map_err(|e| status_of(&e))?;
            let Ok(meta) = fs::symlink_metadata(dirent.path()) else {
                continue; // removed while listing
            };
            entries.push(entry(
                dirent.file_name().to_string_lossy().into_owned(),
                &meta,
            ));
        }
        let handle = self.add(Open::Dir(Some(entries)))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(entries)) => match entries.take() {
                Some(files) => Ok(Name { id, files }),
                None => Err(StatusCode::Eof.into()),
            },
            _ => Err(StatusCode::Failure.with_message("no such directory handle")),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        fs::remove_file(&filename).map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        fs::create_dir(&path).map_err(|e| status_of(&e))?;
        if let Some(mode) = attrs.permissions {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| status_of(&e))?;
        }
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        fs::remove_dir(&path).map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let resolved = resolve(&path).map_err(|e| status_of(&e))?;
        let name = resolved.to_string_lossy().into_owned();
        Ok(Name {
            id,
            files: vec![File {
                filename: name.clone(),
                longname: name,
                attrs: FileAttributes::default(),
            }],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = fs::metadata(&path).map_err(|e| status_of(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        fs::rename(&oldpath, &newpath).map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = fs::read_link(&path).map_err(|e| status_of(&e))?;
        let name = target.to_string_lossy().into_owned();
        Ok(Name {
            id,
            files: vec![File {
                filename: name.clone(),
                longname: name,
                attrs: FileAttributes::default(),
            }],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        std::os::unix::fs::symlink(&targetpath, &linkpath).map_err(|e| status_of(&e))?;
        Ok(ok(id))
    }
}

/// The absolute, canonical form of `path` (relative to the current directory, the build
/// directory); a path whose last part does not exist yet keeps that part.
fn resolve(path: &str) -> io::Result<PathBuf> {
    let path = if path.is_empty() {
        Path::new(".")
    } else {
        Path::new(path)
    };
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(e);
            };
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Ok(fs::canonicalize(parent)?.join(name))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_resolve_keeps_a_missing_last_part() {
        let dir = fs::canonicalize(std::env::temp_dir()).unwrap();
        let missing = dir.join("vmfarm-agent-no-such-file");
        assert_eq!(resolve(missing.to_str().unwrap()).unwrap(), missing);
        assert!(resolve("/no/such/dir/file").is_err());
    }

    #[test]
    fn test_mode_string_reads_like_ls() {
        let dir = std::env::temp_dir().join(format!("vmfarm-agent-mode-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(mode_string(&fs::metadata(&dir).unwrap()), "drwxr-x---");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_errors_map_to_sftp_status_codes() {
        let not_found = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(status_of(&not_found).status_code, StatusCode::NoSuchFile);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(status_of(&denied).status_code, StatusCode::PermissionDenied);
    }
}
