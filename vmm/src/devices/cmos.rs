//! CMOS real-time clock (ports 0x70/0x71): the time registers in BCD, 24-hour mode.
//! Linux reads it for the wall clock when kvm-clock is not there and for `hwclock`.

use std::time::{SystemTime, UNIX_EPOCH};

use super::PioDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 32.768 kHz time base, 1024 Hz rate; update-in-progress never set.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B: u8 = 0x02;
/// "RAM and time valid".
const STATUS_D: u8 = 0x80;

/// The RTC: time comes from the host clock on every read; writes to it are ignored
/// (a guest cannot move the host's time).
#[derive(Default)]
pub struct Cmos {
    index: u8,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The value of RTC register `reg` at `unix` seconds.
pub fn register_at(reg: u8, unix: u64) -> u8 {
    let secs_of_day = unix % 86_400;
    let days = (unix / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    match reg {
        REG_SECONDS => bcd(secs_of_day % 60),
        REG_MINUTES => bcd(secs_of_day / 60 % 60),
        REG_HOURS => bcd(secs_of_day / 3600),
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
        REG_DAY => bcd(u64::from(day)),
        REG_MONTH => bcd(u64::from(month)),
        REG_YEAR => bcd(year.rem_euclid(100) as u64),
        REG_CENTURY => bcd((year / 100) as u64),
        REG_STATUS_A => STATUS_A,
        REG_STATUS_B => STATUS_B,
        REG_STATUS_D => STATUS_D,
        _ => 0,
    }
}

impl PioDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            1 => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                register_at(self.index, now)
            }
            _ => self.index,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == 0 {
            if let Some(b) = data.first() {
                // Bit 7 is the NMI mask, not part of the index.
                self.index = b & 0x7f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_instant_reads_back_in_bcd() {
        // 2026-11-26 10:54:38 UTC, a Thursday.
        let t = 1_795_690_478;
        assert_eq!(register_at(REG_YEAR, t), 0x26);
        assert_eq!(register_at(REG_CENTURY, t), 0x20);
        assert_eq!(register_at(REG_MONTH, t), 0x11);
        assert_eq!(register_at(REG_DAY, t), 0x26);
        assert_eq!(register_at(REG_HOURS, t), 0x10);
        assert_eq!(register_at(REG_MINUTES, t), 0x54);
        assert_eq!(register_at(REG_SECONDS, t), 0x38);
        assert_eq!(register_at(REG_WEEKDAY, t), 5);
    }

    #[test]
    fn leap_day_is_right() {
        // 2024-02-29 00:00:00 UTC.
        let t = 1_709_164_800;
        assert_eq!(register_at(REG_MONTH, t), 0x02);
        assert_eq!(register_at(REG_DAY, t), 0x29);
    }

    #[test]
    fn index_masks_the_nmi_bit() {
        let mut c = Cmos::default();
        c.write(0, &[0x80 | REG_STATUS_B]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], STATUS_B);
    }
}
