//! For tests of banger's scratch space, here and in `banger-oci`: what
//! another local user could plant in the shared scratch directory under the
//! names banger used to give its scratch dirs (feature `test-support`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The uid of the other user the planted directory belongs to.
pub const OTHER_UID: u32 = 54321;

/// A symlink to a directory of someone else's, and a directory another uid
/// owns, both named like a `kind` scratch dir of a process that is gone.
#[derive(Debug)]
pub struct Planted {
    link: PathBuf,
    victim: PathBuf,
    theirs: PathBuf,
}

impl Planted {
    /// Plants both in `shared`; the victim directory lives in `outside`.
    pub fn new(shared: &Path, outside: &Path, kind: &str) -> Planted {
        use std::os::unix::fs::{chown, symlink};
        std::fs::create_dir_all(shared).unwrap();
        let victim = outside.join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("sub/precious"), b"mine").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o751)).unwrap();
        // Names of processes that are gone: pids above the kernel's maximum.
        let link = shared.join(format!("{kind}-999999999-planted"));
        symlink(&victim, &link).unwrap();
        let theirs = shared.join(format!("{kind}-999999998-theirs"));
        std::fs::create_dir_all(theirs.join("sub")).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(theirs.join("sub/file"), b"theirs").unwrap();
        for p in [&theirs, &theirs.join("sub"), &theirs.join("sub/file")] {
            chown(p, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        }
        Planted {
            link,
            victim,
            theirs,
        }
    }

    /// Panics unless everything planted is as it was.
    pub fn untouched(&self) {
        assert_eq!(std::fs::read_link(&self.link).unwrap(), self.victim);
        assert_eq!(
            std::fs::read(self.victim.join("sub/precious")).unwrap(),
            b"mine"
        );
        let mode = self.victim.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o751);
        assert_eq!(
            std::fs::read(self.theirs.join("sub/file")).unwrap(),
            b"theirs"
        );
        let m = self.theirs.metadata().unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (OTHER_UID, 0o755));
    }
}
