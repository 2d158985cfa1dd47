//! The CMOS RAM and real-time clock (ports 0x70, 0x71): the index (bit 7
//! the NMI mask, kept), 128 bytes. The clock reads in BCD, 24-hour (status
//! B 0x02), never in an update (status A bit 7 clear), counting from
//! 2000-01-01 00:00:00 at the domain's first CMOS access (Parallax keeps no
//! wall clock); a guest cannot set it (writes to 0x00-0x09 and to status C
//! and D are ignored). The memory registers say what QEMU's BIOS data
//! would: base memory 640 KiB (0x15/0x16), KiB above 1 MiB up to 0xffff
//! (0x17/0x18 and 0x30/0x31), 64 KiB blocks above 16 MiB (0x34/0x35).
//! Other registers are plain RAM.

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Wire", into = "Wire")]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// The TSC at the clock's 2000-01-01 00:00:00 (`None` before the first
    /// access).
    epoch: Option<u64>,
}

/// [`Cmos`] as a swap saves it (serde takes arrays of at most 32).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Wire {
    index: u8,
    ram: heapless::Vec<u8, 128>,
    epoch: Option<u64>,
}

impl From<Cmos> for Wire {
    fn from(c: Cmos) -> Self {
        Wire {
            index: c.index,
            ram: c.ram.iter().copied().collect(),
            epoch: c.epoch,
        }
    }
}

impl From<Wire> for Cmos {
    fn from(w: Wire) -> Self {
        let mut ram = [0u8; 128];
        ram[..w.ram.len()].copy_from_slice(&w.ram);
        Cmos {
            index: w.index,
            ram,
            epoch: w.epoch,
        }
    }
}

impl Cmos {
    /// A CMOS for a domain with `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[0x0a] = 0x26; // status A: 32.768 kHz base, 1024 Hz rate
        ram[0x0b] = 0x02; // status B: 24-hour, BCD
        ram[0x0d] = 0x80; // status D: RAM and time valid
        ram[0x15] = 0x80; // 640 KiB base memory
        ram[0x16] = 0x02;
        let ext = (ram_bytes / 1024).saturating_sub(1024).min(0xffff) as u16;
        let above16 = (ram_bytes.saturating_sub(16 << 20) / 65536).min(0xffff) as u16;
        for (at, v) in [(0x17, ext), (0x30, ext), (0x34, above16)] {
            ram[at] = v as u8;
            ram[at + 1] = (v >> 8) as u8;
        }
        ram[0x32] = 0x20; // century (BCD)
        Cmos {
            index: 0,
            ram,
            epoch: None,
        }
    }

    pub fn owns(port: u16) -> bool {
        matches!(port, 0x70 | 0x71)
    }

    pub fn write(&mut self, port: u16, v: u8) {
        if port == 0x70 {
            self.index = v;
            return;
        }
        let at = usize::from(self.index & 0x7f);
        if !matches!(at, 0x00..=0x09 | 0x0c | 0x0d) {
            self.ram[at] = v;
        }
    }

    pub fn read(&mut self, port: u16, now: u64, tsc_hz: u64) -> u8 {
        if port == 0x70 {
            return 0xff;
        }
        let at = usize::from(self.index & 0x7f);
        if at > 9 {
            return self.ram[at];
        }
        let epoch = *self.epoch.get_or_insert(now);
        let secs = now.saturating_sub(epoch).checked_div(tsc_hz).unwrap_or(0);
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil(days);
        match at {
            0 => bcd(rest % 60),
            2 => bcd(rest / 60 % 60),
            4 => bcd(rest / 3600),
            6 => ((days + 6) % 7 + 1) as u8, // 2000-01-01 was a Saturday (7)
            7 => bcd(day),
            8 => bcd(month),
            9 => bcd(year % 100),
            _ => 0, // the alarm registers
        }
    }
}

/// The date `days` after 2000-01-01: (year, month, day).
fn civil(mut days: u64) -> (u64, u64, u64) {
    let mut year = 2000;
    loop {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let len = if leap { 366 } else { 365 };
        if days < len {
            let months = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            let mut month = 1;
            for m in months {
                if days < m {
                    break;
                }
                days -= m;
                month += 1;
            }
            return (year, month, days + 1);
        }
        days -= len;
        year += 1;
    }
}
