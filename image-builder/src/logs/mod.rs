//! Reading the hypervisor's log wire: splitting the serial byte stream into
//! records and text ([`Demux`]), and turning records into readable lines
//! ([`Decoder`]), each defmt source decoded with its own ELF file.
//!
//! The wire format is `ipc_schema::wire`. A source announces its name and
//! GNU build id before its first frame; the decoder finds the ELF of that
//! name among the build's files and warns when the build id differs (a log
//! from another build: messages may decode wrongly).

use anyhow::{Context, Result};
use ipc_schema::halt::HaltStatus;
use ipc_schema::wire::{self, MAX_ENCODED, Record, WIRE_KEY};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What the demultiplexer found on the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A decoded record (owned).
    Record(OwnedRecord),
    /// A line of text that is not a record (the boot loader's output).
    Text(String),
    /// Bytes between two zeros that looked like a record but failed to decode.
    Garbled { len: usize },
}

/// [`Record`] with owned data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedRecord {
    Announce {
        source: u8,
        name: String,
        build_id: Vec<u8>,
        wire_key: [u8; 8],
    },
    Defmt {
        source: u8,
        frame: Vec<u8>,
        truncated: bool,
    },
    Console {
        domain: u16,
        bytes: Vec<u8>,
    },
    Text {
        source: u8,
        text: String,
    },
    Halt {
        status: u8,
    },
}

impl From<Record<'_>> for OwnedRecord {
    fn from(r: Record<'_>) -> Self {
        match r {
            Record::Announce {
                source,
                name,
                build_id,
                wire_key,
            } => OwnedRecord::Announce {
                source,
                name: name.to_owned(),
                build_id: build_id.to_vec(),
                wire_key,
            },
            Record::Defmt {
                source,
                frame,
                truncated,
            } => OwnedRecord::Defmt {
                source,
                frame: frame.to_vec(),
                truncated,
            },
            Record::Console { domain, bytes } => OwnedRecord::Console {
                domain,
                bytes: bytes.to_vec(),
            },
            Record::Text { source, text } => OwnedRecord::Text {
                source,
                text: text.to_owned(),
            },
            Record::Halt { status } => OwnedRecord::Halt { status },
        }
    }
}

/// Splits a serial byte stream into records and lines of text.
#[derive(Debug, Default)]
pub struct Demux {
    chunk: Vec<u8>,
    text: Vec<u8>,
    /// Since the last zero, more bytes came than any record has: until the
    /// next zero, everything is text.
    in_text: bool,
}

impl Demux {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns what they completed.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Event>) {
        for &b in bytes {
            if b != 0 {
                if self.in_text {
                    self.text.push(b);
                    if b == b'\n' {
                        self.flush_lines(out, false);
                    }
                    continue;
                }
                self.chunk.push(b);
                // Longer than any record: it is text; release whole lines.
                if self.chunk.len() > MAX_ENCODED {
                    let chunk = std::mem::take(&mut self.chunk);
                    self.text.extend_from_slice(&chunk);
                    self.in_text = true;
                    self.flush_lines(out, false);
                }
                continue;
            }
            if std::mem::take(&mut self.in_text) {
                self.flush_lines(out, true);
                continue;
            }
            let mut chunk = std::mem::take(&mut self.chunk);
            if chunk.is_empty() {
                continue;
            }
            let raw = chunk.clone();
            match wire::decode(&mut chunk) {
                Ok(record) => {
                    self.flush_lines(out, true);
                    out.push(Event::Record(record.into()));
                }
                Err(_) if looks_like_text(&raw) => {
                    self.text.extend_from_slice(&raw);
                    self.flush_lines(out, true);
                }
                Err(_) => {
                    self.flush_lines(out, true);
                    out.push(Event::Garbled { len: raw.len() });
                }
            }
        }
    }

    /// Ends the stream: releases any text still held.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        let chunk = std::mem::take(&mut self.chunk);
        if !chunk.is_empty() {
            if looks_like_text(&chunk) {
                self.text.extend_from_slice(&chunk);
            } else {
                out.push(Event::Garbled { len: chunk.len() });
            }
        }
        self.flush_lines(out, true);
    }

    /// Emits the complete lines of held text (all of it if `all`).
    fn flush_lines(&mut self, out: &mut Vec<Event>, all: bool) {
        while let Some(nl) = self.text.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.text.drain(..=nl).collect();
            push_text(&line, out);
        }
        if all && !self.text.is_empty() {
            let line = std::mem::take(&mut self.text);
            push_text(&line, out);
        }
    }
}

/// Mostly printable: a boot loader's text rather than a damaged record.
fn looks_like_text(bytes: &[u8]) -> bool {
    let printable = bytes
        .iter()
        .filter(|&&b| {
            b == b'\n' || b == b'\r' || b == b'\t' || b == 0x1b || (0x20..0x7f).contains(&b)
        })
        .count();
    printable * 10 >= bytes.len() * 9
}

fn push_text(line: &[u8], out: &mut Vec<Event>) {
    let text = strip_terminal_codes(&String::from_utf8_lossy(line));
    let text = text.trim_end();
    if !text.trim().is_empty() {
        out.push(Event::Text(text.to_owned()));
    }
}

/// Removes ANSI escape sequences and carriage returns (GRUB draws its menu
/// with them).
fn strip_terminal_codes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// One readable log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Seconds since boot, as the source printed it, where it has one.
    pub time: Option<String>,
    /// `kernel`, a service name, `dom<N>` for a guest console, `boot` for
    /// text before the kernel, `wire` for the decoder's own remarks.
    pub source: String,
    /// `error`, `warn`, `info`, `debug`, `trace`, or empty.
    pub level: String,
    pub text: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>10} {:<8} {:<5} {}",
            self.time.as_deref().unwrap_or(""),
            self.source,
            self.level.to_uppercase(),
            self.text
        )
    }
}

/// The ELF files of a build, by source name (`kernel`, service names).
#[derive(Clone, Debug, Default)]
pub struct ElfSet {
    pub files: BTreeMap<String, PathBuf>,
}

impl ElfSet {
    pub fn with(mut self, name: &str, path: &Path) -> Self {
        self.files.insert(name.to_owned(), path.to_owned());
        self
    }

    /// The file with build id `id`: one of the set, or one in the ELF store
    /// (`paths::elf_store`, named `<build id in hex>.elf`).
    pub fn find_build(&self, id: &[u8]) -> Option<PathBuf> {
        let stored = crate::paths::elf_store().join(format!("{}.elf", hex(id)));
        if stored.is_file() {
            return Some(stored);
        }
        self.files
            .values()
            .find(|p| {
                std::fs::read(p)
                    .ok()
                    .and_then(|b| crate::elf::build_id(&b).ok())
                    .is_some_and(|b| b == id)
            })
            .cloned()
    }
}

/// Keeps a copy of `elf` in the ELF store so that logs of a running system
/// it is swapped into decode (see [`ElfSet::find_build`]).
pub fn store_elf(elf: &[u8]) -> Result<()> {
    let id = crate::elf::build_id(elf).context("the ELF has no build id")?;
    let dir = crate::paths::elf_store();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.elf", hex(&id)));
    std::fs::write(&path, elf).with_context(|| format!("writing {}", path.display()))
}

struct Source {
    name: String,
    table: Option<defmt_decoder::Table>,
}

/// Turns events into lines, remembering sources and the run's status.
pub struct Decoder {
    elfs: ElfSet,
    sources: BTreeMap<u8, Source>,
    console: BTreeMap<u16, Vec<u8>>,
    /// The status of the halt record, once seen.
    pub halt: Option<u8>,
}

impl Decoder {
    pub fn new(elfs: ElfSet) -> Self {
        Self {
            elfs,
            sources: BTreeMap::new(),
            console: BTreeMap::new(),
            halt: None,
        }
    }

    /// The lines one event produces.
    pub fn lines(&mut self, event: &Event) -> Vec<LogLine> {
        match event {
            Event::Text(t) => vec![line(None, "boot", "", t.clone())],
            Event::Garbled { len } => {
                vec![line(
                    None,
                    "wire",
                    "warn",
                    format!("{len} garbled bytes skipped"),
                )]
            }
            Event::Record(r) => self.record(r),
        }
    }

    fn record(&mut self, r: &OwnedRecord) -> Vec<LogLine> {
        match r {
            OwnedRecord::Announce {
                source,
                name,
                build_id,
                wire_key,
            } => {
                let mut out = Vec::new();
                if *wire_key != WIRE_KEY.to_bytes() {
                    out.push(line(
                        None,
                        "wire",
                        "error",
                        format!(
                            "source {name} speaks log wire schema {}, this host {}: rebuild one of them",
                            hex(wire_key),
                            hex(&WIRE_KEY.to_bytes())
                        ),
                    ));
                }
                let table = match self.load_table(name, build_id) {
                    Ok((table, warning)) => {
                        match warning {
                            Some(w) => out.push(line(None, "wire", "warn", w)),
                            None => out.push(line(
                                None,
                                "wire",
                                "",
                                format!("source {source}: {name}, build {}", hex(build_id)),
                            )),
                        }
                        Some(table)
                    }
                    Err(e) => {
                        out.push(line(None, "wire", "warn", format!("{name}: {e:#}")));
                        None
                    }
                };
                self.sources.insert(
                    *source,
                    Source {
                        name: name.clone(),
                        table,
                    },
                );
                out
            }
            OwnedRecord::Defmt {
                source,
                frame,
                truncated,
            } => {
                self.ensure_source(*source);
                let s = &self.sources[source];
                let mut l = match &s.table {
                    None => line(
                        None,
                        &s.name,
                        "",
                        format!("<defmt frame {:02x?}: no table>", frame),
                    ),
                    Some(table) => match table.decode(frame) {
                        Ok((f, _)) => line(
                            f.display_timestamp().map(|t| t.to_string()),
                            &s.name,
                            f.level().map_or("", |l| l.as_str()),
                            f.display_message().to_string(),
                        ),
                        Err(e) => line(
                            None,
                            &s.name,
                            "warn",
                            format!("<undecodable frame ({e:?}): {:02x?}>", frame),
                        ),
                    },
                };
                if *truncated {
                    l.text.push_str(" [truncated]");
                }
                vec![l]
            }
            OwnedRecord::Console { domain, bytes } => {
                let buf = self.console.entry(*domain).or_default();
                buf.extend_from_slice(bytes);
                let mut out = Vec::new();
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let text: Vec<u8> = buf.drain(..=nl).collect();
                    let text = escape_console(String::from_utf8_lossy(&text).trim_end());
                    out.push(line(None, &format!("dom{domain}"), "", text));
                }
                out
            }
            OwnedRecord::Text { source, text } => {
                self.ensure_source(*source);
                vec![line(
                    None,
                    &self.sources[source].name.clone(),
                    "",
                    text.clone(),
                )]
            }
            OwnedRecord::Halt { status } => {
                self.halt = Some(*status);
                let what =
                    HaltStatus::from_code(*status).map_or("unknown status", |s| s.describe());
                vec![line(
                    None,
                    "wire",
                    "",
                    format!("halted with status {status} ({what})"),
                )]
            }
        }
    }

    /// A source seen without an announcement (a capture that started late):
    /// source 0 is the kernel; others stay unnamed.
    fn ensure_source(&mut self, source: u8) {
        if self.sources.contains_key(&source) {
            return;
        }
        let name = if source == 0 {
            "kernel".to_owned()
        } else {
            format!("source{source}")
        };
        let table = self.load_table(&name, &[]).ok().map(|(t, _)| t);
        self.sources.insert(source, Source { name, table });
    }

    /// The defmt table of the ELF named `name`, with a warning where its
    /// build id differs from the announced one.
    fn load_table(
        &self,
        name: &str,
        build_id: &[u8],
    ) -> Result<(defmt_decoder::Table, Option<String>)> {
        // The ELF with the announced build id, wherever it is: a service
        // swapped in since the image was built is in the ELF store.
        let by_id = (!build_id.is_empty())
            .then(|| self.elfs.find_build(build_id))
            .flatten();
        let path = match &by_id {
            Some(p) => p,
            None => self
                .elfs
                .files
                .get(name)
                .with_context(|| format!("no ELF file for source `{name}` in this build"))?,
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let table = defmt_decoder::Table::parse(&bytes)
            .with_context(|| format!("reading the defmt table of {}", path.display()))?
            .with_context(|| format!("{} has no defmt table", path.display()))?;
        let warning = match crate::elf::build_id(&bytes) {
            Ok(id) if !build_id.is_empty() && id != build_id => Some(format!(
                "{name}: the log comes from build {} but {} is build {}: messages may decode wrongly",
                hex(build_id),
                path.display(),
                hex(&id)
            )),
            _ => None,
        };
        Ok((table, warning))
    }
}

fn line(time: Option<String>, source: &str, level: &str, text: String) -> LogLine {
    LogLine {
        time,
        source: source.to_owned(),
        level: level.to_owned(),
        text,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a whole capture.
pub fn decode_all(bytes: &[u8], elfs: ElfSet) -> (Vec<LogLine>, Option<u8>) {
    let mut demux = Demux::new();
    let mut events = Vec::new();
    demux.push(bytes, &mut events);
    demux.finish(&mut events);
    let mut decoder = Decoder::new(elfs);
    let lines = events.iter().flat_map(|e| decoder.lines(e)).collect();
    (lines, decoder.halt)
}

#[cfg(test)]
mod tests;

/// A guest's console line as the host shows it: control characters (escape
/// sequences that would clear or move about the host's terminal, carriage
/// returns that would overwrite the line) and bidirectional overrides become
/// visible `\xNN` / `\u{NNNN}` escapes, so a guest can neither change the
/// terminal nor pass its text off as another source's.
pub fn escape_console(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            c if c.is_control() && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}
