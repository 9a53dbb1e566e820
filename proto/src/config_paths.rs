//! How the server's and the worker's config files name files: a relative path is relative to
//! the folder of the config file that holds it (or would hold it, for a default), not to the
//! folder the process was started in; so `/etc/vmfarm/worker.toml` means the same from a unit
//! and from a shell.

use std::path::{Path, PathBuf};

/// Makes `path` relative to `config_file`'s folder, if it is relative.
pub fn beside(config_file: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        let folder = config_file.parent().unwrap_or(Path::new("."));
        *path = folder.join(&*path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_relative_paths_are_beside_the_config_file() {
        let file = Path::new("/etc/vmfarm/worker.toml");
        for (given, want) in [
            ("images", "/etc/vmfarm/images"),
            ("./data/work", "/etc/vmfarm/./data/work"),
            ("/var/lib/vmfarm/images", "/var/lib/vmfarm/images"),
        ] {
            let mut path = PathBuf::from(given);
            beside(file, &mut path);
            assert_eq!(path, Path::new(want));
        }
        let mut path = PathBuf::from("data");
        beside(Path::new("server.toml"), &mut path);
        assert_eq!(path, Path::new("data"));
    }
}
