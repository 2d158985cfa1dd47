//! The 8254 programmable interval timer of a PC (ports 0x40-0x43) and the
//! system control port B (0x61): channel 0 drives IRQ 0, channel 2 is gated
//! by port 0x61 bit 0 and its output is read at bit 5 (how kernels measure
//! the TSC against it). Counters run at 1.193182 MHz from the moment their
//! count is written, computed from the TSC (no exit per tick): modes 0 and 4
//! count down once, modes 2 and 3 (also written as 6 and 7) repeat. Reads
//! give the current count (lobyte, hibyte or both in turn), the latch
//! command and the read-back command freeze count or status. BCD counting
//! is taken as binary; modes 1 and 5 (hardware-triggered) count as 0 and 4.

use serde::{Deserialize, Serialize};

/// The input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// One channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// The mode (0-5).
    pub mode: u8,
    /// 1 lobyte, 2 hibyte, 3 lobyte then hibyte.
    access: u8,
    /// The count written (0 means 65536).
    reload: u16,
    /// Whether a count was written (the counter runs).
    pub running: bool,
    /// The TSC when it started counting.
    start: u64,
    /// The lobyte of a two-byte write, waiting for its hibyte.
    low: Option<u8>,
    /// The next two-byte read returns the hibyte.
    read_high: bool,
    /// A latched count (and whether its hibyte is next).
    latched: Option<u16>,
    latched_high: bool,
    /// A latched status byte (read-back).
    status: Option<u8>,
    /// For channel 0: the TSC of the next IRQ 0 edge, `u64::MAX` for none.
    pub next_edge: u64,
}

/// The three channels and port 0x61.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    pub channels: [Channel; 3],
    /// Port 0x61 bits 0 (channel 2's gate) and 1 (speaker data).
    port61: u8,
    /// The TSC when channel 2's gate last went high.
    gate_since: u64,
    /// Port 0x61 bit 4 (the refresh toggle) flips on each read.
    refresh: bool,
}

impl Channel {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            65536
        } else {
            u64::from(self.reload)
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    /// Input clock ticks since it started counting (`since`: the later of
    /// the load and the gate).
    fn ticks(&self, now: u64, since: u64, tsc_hz: u64) -> u64 {
        if tsc_hz == 0 {
            return 0;
        }
        let elapsed = now.saturating_sub(since.max(self.start));
        (u128::from(elapsed) * u128::from(PIT_HZ) / u128::from(tsc_hz)) as u64
    }

    /// The count it would read now.
    fn count(&self, ticks: u64) -> u16 {
        if !self.running {
            return self.reload;
        }
        let p = self.period();
        if self.periodic() {
            (p - ticks % p) as u16
        } else {
            // Counts down past 0 and wraps, as the hardware does.
            (p.wrapping_sub(ticks) & 0xffff) as u16
        }
    }

    /// Its output pin now.
    fn out(&self, ticks: u64) -> bool {
        if !self.running {
            return self.mode != 0;
        }
        match self.mode {
            0 | 1 => ticks >= self.period(),
            // Square wave: high for the first half of each period.
            3 => ticks % self.period() < self.period().div_ceil(2),
            // Rate generator and strobes: low for one tick per period.
            _ => ticks % self.period() != self.period() - 1,
        }
    }

    /// TSC ticks for `n` input clock ticks.
    fn tsc_for(n: u64, tsc_hz: u64) -> u64 {
        (u128::from(n) * u128::from(tsc_hz)).div_ceil(u128::from(PIT_HZ)) as u64
    }
}

impl Pit {
    /// Whether `port` is one of its.
    pub fn owns(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    fn since(&self, ch: usize) -> u64 {
        if ch == 2 { self.gate_since } else { 0 }
    }

    /// A write to `port` at TSC `now`.
    pub fn write(&mut self, port: u16, v: u8, now: u64, tsc_hz: u64) {
        match port {
            0x43 => self.control(v, now, tsc_hz),
            0x61 => {
                if v & 1 != 0 && self.port61 & 1 == 0 {
                    self.gate_since = now;
                }
                self.port61 = v & 3;
            }
            _ => {
                let ch = usize::from(port - 0x40);
                let c = &mut self.channels[ch];
                let count = match (c.access, c.low) {
                    (1, _) => Some(u16::from(v)),
                    (2, _) => Some(u16::from(v) << 8),
                    (_, None) => {
                        c.low = Some(v);
                        None
                    }
                    (_, Some(lo)) => {
                        c.low = None;
                        Some(u16::from(lo) | u16::from(v) << 8)
                    }
                };
                if let Some(count) = count {
                    c.reload = count;
                    c.running = true;
                    c.start = now;
                    if ch == 0 {
                        c.next_edge = now.saturating_add(Channel::tsc_for(c.period(), tsc_hz));
                    }
                }
            }
        }
    }

    fn control(&mut self, v: u8, now: u64, tsc_hz: u64) {
        let sel = v >> 6;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses,
            // of the channels in bits 1-3.
            for ch in 0..3 {
                if v & (2 << ch) == 0 {
                    continue;
                }
                let ticks = self.channels[ch].ticks(now, self.since(ch), tsc_hz);
                let c = &mut self.channels[ch];
                if v & 0x20 == 0 && c.latched.is_none() {
                    c.latched = Some(c.count(ticks));
                    c.latched_high = false;
                }
                if v & 0x10 == 0 && c.status.is_none() {
                    c.status = Some(
                        (u8::from(c.out(ticks)) << 7)
                            | (u8::from(!c.running) << 6)
                            | (c.access << 4)
                            | (c.mode << 1),
                    );
                }
            }
            return;
        }
        let ch = usize::from(sel);
        let ticks = self.channels[ch].ticks(now, self.since(ch), tsc_hz);
        let c = &mut self.channels[ch];
        let access = (v >> 4) & 3;
        if access == 0 {
            // Counter latch.
            if c.latched.is_none() {
                c.latched = Some(c.count(ticks));
                c.latched_high = false;
            }
            return;
        }
        let mode = (v >> 1) & 7;
        *c = Channel {
            mode: if mode >= 6 { mode - 4 } else { mode },
            access,
            next_edge: u64::MAX,
            ..Channel::default()
        };
    }

    /// A read of `port` at TSC `now`.
    pub fn read(&mut self, port: u16, now: u64, tsc_hz: u64) -> u8 {
        match port {
            0x43 => 0xff,
            0x61 => {
                self.refresh = !self.refresh;
                let ticks = self.channels[2].ticks(now, self.gate_since, tsc_hz);
                let out2 = self.port61 & 1 != 0 && self.channels[2].out(ticks);
                self.port61 | (u8::from(self.refresh) << 4) | (u8::from(out2) << 5)
            }
            _ => {
                let ch = usize::from(port - 0x40);
                let ticks = self.channels[ch].ticks(now, self.since(ch), tsc_hz);
                let c = &mut self.channels[ch];
                if let Some(s) = c.status.take() {
                    return s;
                }
                let (count, high) = match c.latched {
                    Some(l) => (l, c.latched_high),
                    None => (c.count(ticks), c.read_high),
                };
                let byte = match c.access {
                    2 => (count >> 8) as u8,
                    1 => count as u8,
                    _ if high => (count >> 8) as u8,
                    _ => count as u8,
                };
                // A latch is released once read whole.
                let whole = c.access != 3 || high;
                if c.access == 3 {
                    if c.latched.is_some() {
                        c.latched_high = !high;
                    } else {
                        c.read_high = !high;
                    }
                }
                if whole {
                    c.latched = None;
                }
                byte
            }
        }
    }

    /// Whether IRQ 0 had an edge by `now`: true at most once per call (the
    /// edges a late caller missed are one, as a PC whose interrupts were
    /// held off sees one); the next edge moves on.
    pub fn irq0_due(&mut self, now: u64, tsc_hz: u64) -> bool {
        let c = &mut self.channels[0];
        if !c.running || now < c.next_edge {
            return false;
        }
        if c.periodic() && tsc_hz != 0 {
            let period = Channel::tsc_for(c.period(), tsc_hz).max(1);
            let behind = (now - c.next_edge) / period + 1;
            c.next_edge = c.next_edge.saturating_add(behind.saturating_mul(period));
        } else {
            c.next_edge = u64::MAX;
        }
        true
    }

    /// No IRQ 0 edge before `tsc` (the edges until then are lost).
    pub fn hold_off(&mut self, tsc: u64) {
        let c = &mut self.channels[0];
        if c.running && c.next_edge != u64::MAX {
            c.next_edge = c.next_edge.max(tsc);
        }
    }

    /// The TSC of the next IRQ 0 edge (`u64::MAX`: none).
    pub fn next_edge(&self) -> u64 {
        let c = &self.channels[0];
        if c.running { c.next_edge } else { u64::MAX }
    }
}
