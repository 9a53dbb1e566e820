//! The CMOS real-time clock at ports 0x70/0x71, telling the host's time (UTC). Without it the
//! guest's rtc_cmos probe waits for an update cycle that never ends (~8.5 s nested).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz rate; the update-in-progress bit (7) is never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_DEFAULT: u8 = 0x02;
const STATUS_B_BINARY: u8 = 1 << 2;
const STATUS_B_24H: u8 = 1 << 1;
/// Status D: the battery is good.
const STATUS_D_VALID: u8 = 0x80;

/// The CMOS's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    index: u8,
    ram: Vec<u8>,
}

/// The CMOS: an index register, 128 bytes of RAM, and the clock.
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    now: fn() -> SystemTime,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(SystemTime::now)
    }
}

impl Rtc {
    /// A CMOS that reads the host's clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// A CMOS that reads `now` for the time (tests use a fixed clock).
    pub fn with_clock(now: fn() -> SystemTime) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A as usize] = STATUS_A_DEFAULT;
        ram[STATUS_B as usize] = STATUS_B_DEFAULT;
        ram[STATUS_D as usize] = STATUS_D_VALID;
        Self { index: 0, ram, now }
    }

    /// Its index register and RAM, for a snapshot (the clock is the host's).
    pub fn state(&self) -> RtcState {
        RtcState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// A CMOS as `state` left it; `None` when its RAM is not 128 bytes.
    pub fn restored(state: &RtcState) -> Option<Self> {
        Some(Self {
            index: state.index,
            ram: state.ram.as_slice().try_into().ok()?,
            ..Self::new()
        })
    }

    fn encode(&self, value: u8) -> u8 {
        if self.ram[STATUS_B as usize] & STATUS_B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn read_register(&self, index: u8) -> u8 {
        let secs = (self.now)()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let days = (secs / 86_400) as i64;
        let time = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        let hour = (time / 3600) as u8;
        match index {
            SECONDS => self.encode((time % 60) as u8),
            MINUTES => self.encode((time / 60 % 60) as u8),
            HOURS if self.ram[STATUS_B as usize] & STATUS_B_24H != 0 => self.encode(hour),
            HOURS => {
                let h12 = match hour % 12 {
                    0 => 12,
                    h => h,
                };
                self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
            }
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u8),
            DAY => self.encode(day),
            MONTH => self.encode(month),
            YEAR => self.encode((year % 100) as u8),
            CENTURY => self.encode((year / 100) as u8),
            // Reading C acknowledges interrupts; none are ever pending.
            STATUS_C => 0,
            _ => self.ram[usize::from(index & 0x7f)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            // The guest cannot set the host's clock; the time registers stay read-only.
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
            STATUS_A => self.ram[STATUS_A as usize] = value & 0x7f,
            STATUS_C | STATUS_D => {}
            _ => self.ram[usize::from(index & 0x7f)] = value,
        }
    }
}

/// (year, month 1..=12, day 1..=31) of `days` since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (u32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year.max(0) as u32, month, day)
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; it is not part of the index.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2026-11-22 05:07:09 UTC, a Sunday.
    fn fixed() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_324_029)
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index | 0x80]);
        let mut v = [0u8];
        rtc.read(1, &mut v);
        v[0]
    }

    #[test]
    fn test_rtc_reads_host_time_in_bcd_then_binary() {
        let mut rtc = Rtc::with_clock(fixed);
        let bcd: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&i| read(&mut rtc, i))
            .collect();
        assert_eq!(bcd, vec![0x09, 0x07, 0x05, 0x01, 0x22, 0x11, 0x26, 0x20]);
        assert_eq!(
            read(&mut rtc, STATUS_A) & 0x80,
            0,
            "never update-in-progress"
        );
        assert_eq!(read(&mut rtc, STATUS_D), 0x80);

        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[STATUS_B_BINARY | STATUS_B_24H]);
        assert_eq!(read(&mut rtc, DAY), 22);
        assert_eq!(read(&mut rtc, YEAR), 26);
    }

    #[test]
    fn test_rtc_keeps_ram_and_ignores_time_writes() {
        let mut rtc = Rtc::with_clock(fixed);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[MINUTES]);
        rtc.write(1, &[0x59]);
        assert_eq!(read(&mut rtc, MINUTES), 0x07);
        rtc.write(5, &[1]);
        rtc.write(1, &[]);
    }

    #[test]
    fn test_rtc_12_hour_mode_sets_pm_bit() {
        fn afternoon() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(13 * 3600)
        }
        let mut rtc = Rtc::with_clock(afternoon);
        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[0]);
        assert_eq!(read(&mut rtc, HOURS), 0x81);
    }

    #[test]
    fn test_civil_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
    }
}
