//! virtio-rng: fills each writable buffer from the host's getrandom(2).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{Chain, next_chain};
use super::device::{ActivateError, Interrupt, VirtioDevice};

/// The virtio device type of an entropy device.
pub const DEVICE_TYPE_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// The most entropy handed out for one request.
const MAX_REQUEST: u64 = 64 * 1024;

/// The entropy device. Requests are served synchronously on the notifying vCPU thread:
/// getrandom never blocks once the host's pool is initialized.
pub struct Rng {
    max_sizes: [u16; 1],
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

impl Rng {
    /// A new, not yet activated entropy device.
    pub fn new() -> Self {
        Rng {
            max_sizes: [QUEUE_SIZE],
            active: None,
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let queue = queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(ActivateError::QueueCount { expected: 1, got })?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Some(active) = &mut self.active {
            active.process();
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        true
    }
}

impl Active {
    fn process(&mut self) {
        if self.interrupt.needs_reset() {
            return;
        }
        let mut used = false;
        loop {
            let chain = match next_chain(&mut self.queue, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    self.interrupt
                        .set_needs_reset(&format!("rng queue: {err:?}"));
                    break;
                }
            };
            let head = chain.head_index();
            let written = match Chain::parse(chain, &self.mem, u64::from(u32::MAX)) {
                Ok(chain) => self.fill(&chain),
                Err(err) => {
                    self.interrupt.count_error();
                    tracing::warn!(%err, "malformed virtio-rng request");
                    0
                }
            };
            if let Err(err) = self.queue.add_used(&self.mem, head, written) {
                self.interrupt
                    .set_needs_reset(&format!("rng used ring: {err:?}"));
                break;
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used();
        }
    }

    fn fill(&self, chain: &Chain) -> u32 {
        let len = chain.writable_len().min(MAX_REQUEST) as usize;
        let mut buf = vec![0u8; len];
        if let Err(err) = getrandom(&mut buf) {
            self.interrupt.count_error();
            tracing::error!(%err, "getrandom failed");
            return 0;
        }
        match chain.write_at(&self.mem, 0, &buf) {
            Ok(()) => len as u32,
            Err(err) => {
                self.interrupt.count_error();
                tracing::warn!(%err, "virtio-rng write failed");
                0
            }
        }
    }
}

/// Fills `buf` from the host's getrandom(2).
pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{DATA_BASE, TestDriver};

    #[test]
    fn test_rng_fills_writable_buffers() {
        let mut d = TestDriver::new(Box::new(Rng::new()), 16);
        d.write_mem(DATA_BASE, &[0u8; 4096]);
        let head = d.submit(
            0,
            &[(DATA_BASE, 1024, true), (DATA_BASE + 2048, 1024, true)],
        );
        assert_eq!(d.wait_used(0), (u32::from(head), 2048));
        let bytes = d.read_mem(DATA_BASE, 4096);
        assert!(bytes[..1024].iter().filter(|&&b| b == 0).count() < 64);
        assert!(bytes[2048..3072].iter().filter(|&&b| b == 0).count() < 64);
        assert!(bytes[1024..2048].iter().all(|&b| b == 0));
        assert!(d.irq.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert_eq!(d.read32(0x60) & 1, 1);
    }

    #[test]
    fn test_rng_rejects_buffer_outside_memory() {
        let mut d = TestDriver::new(Box::new(Rng::new()), 16);
        let head = d.submit(0, &[(u64::MAX - 10, 100, true)]);
        assert_eq!(d.wait_used(0), (u32::from(head), 0));
        assert_eq!(d.transport.error_count(), 1);
        // The device keeps working afterwards.
        let head = d.submit(0, &[(DATA_BASE, 16, true)]);
        assert_eq!(d.wait_used(0), (u32::from(head), 16));
    }

    #[test]
    fn test_rng_impossible_avail_index_marks_needs_reset() {
        let mut d = TestDriver::new(Box::new(Rng::new()), 16);
        d.queues[0].set_avail_idx(&d.mem, 1000);
        d.notify(0);
        assert_eq!(d.status() & 0x40, 0x40);
        d.write32(0x70, 0);
        assert_eq!(d.status(), 0);
    }
}
