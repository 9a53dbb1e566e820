//! The kernel command line of the boot contract (CONTRACTS.md, "Worker <-> guest").

use std::fmt::Write as _;

/// The agent's host channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    /// A virtio-serial port of this name (QEMU).
    Vport(String),
    /// AF_VSOCK on this port (the integrated VMM).
    Vsock(u32),
}

impl ChannelKind {
    /// The port name the QEMU backend gives its virtio-serial port.
    pub const QEMU_PORT: &str = "org.vmfarm.ssh";
}

/// Everything the worker tells the guest on the command line.
#[derive(Debug, Clone)]
pub struct GuestCmdline {
    pub channel: ChannelKind,
    /// The job's ssh-ed25519 public key, base64 of the OpenSSH wire blob.
    pub key_blob: String,
    /// The job id.
    pub hostname: String,
    /// Unix seconds.
    pub time: u64,
    pub user: String,
    /// Under TCG the TSC calibration can hang without `tsc_early_khz`.
    pub emulated: bool,
}

impl GuestCmdline {
    pub fn compose(&self) -> String {
        let mut line = String::from("console=ttyS0 reboot=k panic=-1");
        if self.emulated {
            line.push_str(" tsc_early_khz=2000000");
        }
        let channel = match &self.channel {
            ChannelKind::Vport(name) => format!("vport:{name}"),
            ChannelKind::Vsock(port) => format!("vsock:{port}"),
        };
        let _ = write!(
            line,
            " vmfarm.channel={channel} vmfarm.key={} vmfarm.hostname={} vmfarm.time={} vmfarm.user={}",
            self.key_blob, self.hostname, self.time, self.user
        );
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_compose_follows_the_boot_contract() {
        let mut c = GuestCmdline {
            channel: ChannelKind::Vport(ChannelKind::QEMU_PORT.into()),
            key_blob: "AAAA".into(),
            hostname: "job-7".into(),
            time: 1_795_000_000,
            user: "build".into(),
            emulated: true,
        };
        assert_eq!(
            c.compose(),
            "console=ttyS0 reboot=k panic=-1 tsc_early_khz=2000000 vmfarm.channel=vport:org.vmfarm.ssh \
             vmfarm.key=AAAA vmfarm.hostname=job-7 vmfarm.time=1795000000 vmfarm.user=build"
        );
        c.channel = ChannelKind::Vsock(22);
        c.emulated = false;
        assert!(
            c.compose()
                .starts_with("console=ttyS0 reboot=k panic=-1 vmfarm.channel=vsock:22 ")
        );
    }
}
