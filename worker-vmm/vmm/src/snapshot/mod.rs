//! Snapshots of a running guest: `vm run --save DIR` boots a VM as usual and, when a line `save`
//! arrives on its stdin, stops the vCPUs, stops every device's data path, writes the memory the
//! guest touched to `DIR/memory` (a sparse file as long as its RAM) and the state of KVM and of
//! the devices to `DIR/devices`, and ends;
//! `vm run --restore DIR` builds the same VM from them instead of booting: `DIR/memory` (or
//! `--restore-memory`) mapped private, the devices put back as they were, the vCPUs resumed.
//!
//! - The files are opened before the VMM enters its jail and before its seccomp filter, so a
//!   jailed VMM saves into and restores from folders outside its root.
//! - The disks are the restoring VM's own (the caller gives each the disk as it was when saved,
//!   under an overlay); a vsock connection open when the guest was saved is gone (its device is
//!   reset), so save while the guest has none: vmfarm saves a guest whose agent is waiting.
//! - A snapshot names the VMM that wrote it ([`VMM_VERSION`]) and its VM's shape; one from
//!   another VMM, or of another shape than the restoring VM's, is refused saying which.

pub mod kvm_state;

use std::fs::File;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::legacy::rtc::RtcState;
use crate::legacy::serial::UartState;
use crate::memory::{GuestMem, save_memory};
use crate::virtio::mmio::TransportState;
use kvm_state::{VcpuState, VmKvmState};
use vm_superio::serial::SerialState;

/// The VMM that writes and reads snapshots: its version and the state's format. A snapshot
/// written by any other is refused.
pub const VMM_VERSION: &str = concat!("vmfarm-vmm ", env!("CARGO_PKG_VERSION"), " state 1");

/// The line on the VMM's stdin that has it save (`--save`).
pub const SAVE_LINE: &str = "save";

/// The memory's file in a snapshot's folder.
pub const MEMORY_FILE: &str = "memory";

/// The state's file in a snapshot's folder (the name the `qemu` backend gives its devices'
/// state too), beside `memory`.
pub const STATE_FILE: &str = "devices";

/// The largest state file read (a few KiB per vCPU and device).
const MAX_STATE: u64 = 16 << 20;

/// Everything of a saved VM but its memory and disks.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// [`VMM_VERSION`] of the VMM that saved it.
    pub vmm: String,
    /// The VM's shape: vCPUs, RAM bytes, the virtio devices' types in slot order.
    pub shape: Shape,
    /// KVM's VM-wide state.
    pub kvm: VmKvmState,
    /// Each vCPU's.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    #[serde(with = "UartState")]
    pub serial: SerialState,
    /// The CMOS.
    pub rtc: RtcState,
    /// Each virtio-mmio transport, in slot order.
    pub virtio: Vec<TransportState>,
}

/// What a restoring VM must have as the saved one did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub cpus: u8,
    pub memory: u64,
    /// The virtio device types (2 block, 19 vsock, 4 rng), in slot order.
    pub devices: Vec<u32>,
}

/// A snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot.
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this VMM reads.
    #[error("the snapshot's state {} is not readable: {why}; save the guest again", path.display())]
    Unreadable { path: PathBuf, why: String },
    /// It was written by another VMM.
    #[error("the snapshot was saved by {saved}, this is {VMM_VERSION}: boot the guest instead")]
    OtherVmm { saved: String },
    /// The restoring VM is not shaped as the saved one.
    #[error(
        "the snapshot is of a VM with {saved:?}; this one has {asked:?}: restore it with the \
         vCPUs, memory and devices it was saved with, or boot the guest"
    )]
    OtherShape { saved: Shape, asked: Shape },
    /// The memory file is not as long as the VM's RAM.
    #[error(
        "the snapshot's memory file holds {len} bytes where the VM has {memory}: it is not this \
         snapshot's memory; save the guest again"
    )]
    MemoryLength { len: u64, memory: u64 },
    /// KVM's part.
    #[error("KVM state")]
    Kvm(#[from] kvm_state::KvmStateError),
    /// A device's part.
    #[error("the state of {what}: {why}")]
    Device { what: String, why: String },
}

fn file_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::File { what, path, source }
}

/// Where `--save` writes: both files made (the memory as long as the RAM, sparse) before the
/// VMM is jailed.
pub struct SaveTo {
    /// The folder, for messages.
    dir: PathBuf,
    /// Where the guest's RAM goes.
    memory: File,
    /// Where the state goes.
    state: File,
}

impl SaveTo {
    /// Creates `dir` (if needed) and its `memory` (`memory` bytes) and `state` files.
    pub fn create(dir: &Path, memory: u64) -> Result<SaveTo, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(file_error("creating the snapshot folder", dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(file_error("creating", &path))
        };
        let memory_file = open(MEMORY_FILE)?;
        memory_file
            .set_len(memory)
            .map_err(file_error("sizing", &dir.join(MEMORY_FILE)))?;
        Ok(SaveTo {
            dir: dir.to_owned(),
            memory: memory_file,
            state: open(STATE_FILE)?,
        })
    }

    /// Writes `memory` and `state`.
    ///
    /// # Safety
    ///
    /// As [`save_memory`]'s: no vCPU runs and every device's data path is stopped.
    pub unsafe fn write(&self, state: &VmState, memory: &GuestMem) -> Result<(), SnapshotError> {
        let (memory_path, state_path) = (self.dir.join(MEMORY_FILE), self.dir.join(STATE_FILE));
        // SAFETY: the caller's promise is save_memory's.
        unsafe { save_memory(memory, &self.memory) }
            .map_err(file_error("writing", &memory_path))?;
        let mut writer = std::io::BufWriter::new(&self.state);
        serde_json::to_writer(&mut writer, state)
            .map_err(std::io::Error::other)
            .and_then(|()| writer.flush())
            .map_err(file_error("writing", &state_path))?;
        self.state
            .sync_all()
            .map_err(file_error("syncing", &state_path))?;
        self.memory
            .sync_all()
            .map_err(file_error("syncing", &memory_path))
    }
}

/// What `--restore` reads, opened and checked before the VMM is jailed.
pub struct RestoreFrom {
    /// The saved memory, mapped private.
    pub memory: File,
    pub state: VmState,
}

impl RestoreFrom {
    /// Reads the state in `dir` and opens the memory file (`memory`, else `dir/memory`), for a VM
    /// of `shape`.
    pub fn open(
        dir: &Path,
        memory: Option<&Path>,
        shape: &Shape,
    ) -> Result<RestoreFrom, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        let file = File::open(&state_path).map_err(file_error("opening", &state_path))?;
        let unreadable = |why: String| SnapshotError::Unreadable {
            path: state_path.clone(),
            why,
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE + 1)
            .read_to_end(&mut bytes)
            .map_err(file_error("reading", &state_path))?;
        if bytes.len() as u64 > MAX_STATE {
            return Err(unreadable(format!("it is longer than {MAX_STATE} bytes")));
        }
        // The version first, so that a state of another format says whose it is.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
        let saved = value.get("vmm").and_then(|v| v.as_str()).unwrap_or("");
        if saved != VMM_VERSION {
            return Err(SnapshotError::OtherVmm {
                saved: if saved.is_empty() {
                    "an unknown program".into()
                } else {
                    saved.into()
                },
            });
        }
        let state: VmState =
            serde_json::from_value(value).map_err(|e| unreadable(e.to_string()))?;
        if &state.shape != shape {
            return Err(SnapshotError::OtherShape {
                saved: state.shape,
                asked: shape.clone(),
            });
        }
        if state.vcpus.len() != usize::from(shape.cpus) || state.virtio.len() != shape.devices.len()
        {
            return Err(unreadable(
                "its vCPUs or devices do not match its shape".into(),
            ));
        }
        let memory_path = memory.map_or_else(|| dir.join(MEMORY_FILE), Path::to_owned);
        let memory = File::open(&memory_path).map_err(file_error("opening", &memory_path))?;
        let len = memory
            .metadata()
            .map_err(file_error("reading", &memory_path))?
            .len();
        if len != shape.memory {
            return Err(SnapshotError::MemoryLength {
                len,
                memory: shape.memory,
            });
        }
        Ok(RestoreFrom { memory, state })
    }
}

/// Waits (on a thread of its own) for [`SAVE_LINE`] on stdin, then calls `save` once; stdin
/// closed first, nothing happens.
pub fn on_save_line(save: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    crate::thread::spawn("save-line", crate::thread::Stack::Small, move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            // The worker writes the line; a longer one is not it.
            match stdin.lock().take(64).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.trim() == SAVE_LINE => return save(),
                Ok(_) => tracing::warn!(line = line.trim(), "unknown line on stdin"),
            }
        }
    })
    .map(drop)
}
