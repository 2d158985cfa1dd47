use super::*;
use ipc_schema::wire::{MAX_ENCODED, Record, WIRE_KEY, encode};

fn wire(r: Record<'_>) -> Vec<u8> {
    let mut out = [0u8; MAX_ENCODED];
    encode(&r, &mut out).unwrap().to_vec()
}

fn events(stream: &[u8], split: usize) -> Vec<Event> {
    let mut d = Demux::new();
    let mut out = Vec::new();
    for piece in stream.chunks(split.max(1)) {
        d.push(piece, &mut out);
    }
    d.finish(&mut out);
    out
}

#[test]
fn boot_loader_text_then_records_in_any_split() {
    let mut stream = b"\x1b[2J\x1b[1;1H  Booting `Parallax'\r\n\r\n".to_vec();
    stream.push(0);
    stream.extend(wire(Record::Halt { status: 0 }));
    stream.extend(wire(Record::Console {
        domain: 2,
        bytes: b"hi\n",
    }));
    for split in [1, 2, 3, 7, 64, 4096] {
        assert_eq!(
            events(&stream, split),
            [
                Event::Text("  Booting `Parallax'".into()),
                Event::Record(OwnedRecord::Halt { status: 0 }),
                Event::Record(OwnedRecord::Console {
                    domain: 2,
                    bytes: b"hi\n".to_vec()
                }),
            ],
            "split {split}"
        );
    }
}

#[test]
fn garbled_bytes_are_reported_and_the_next_record_still_decodes() {
    let mut stream = vec![0x03, 0xff, 0x81, 0x92, 0xfe, 0x00];
    stream.extend(wire(Record::Halt { status: 4 }));
    assert_eq!(
        events(&stream, 5),
        [
            Event::Garbled { len: 5 },
            Event::Record(OwnedRecord::Halt { status: 4 })
        ]
    );
}

#[test]
fn a_corrupted_record_costs_only_itself() {
    let mut first = wire(Record::Console {
        domain: 1,
        bytes: b"lost\n",
    });
    first[3] ^= 0x40;
    let mut stream = first;
    stream.extend(wire(Record::Console {
        domain: 1,
        bytes: b"kept\n",
    }));
    let got = events(&stream, 3);
    assert_eq!(got.len(), 2);
    assert!(matches!(got[0], Event::Garbled { .. } | Event::Text(_)));
    assert_eq!(
        got[1],
        Event::Record(OwnedRecord::Console {
            domain: 1,
            bytes: b"kept\n".to_vec()
        })
    );
}

#[test]
fn long_text_is_released_line_by_line_before_any_zero() {
    let text = "x".repeat(MAX_ENCODED) + "\nsecond line\n";
    let mut d = Demux::new();
    let mut out = Vec::new();
    d.push(text.as_bytes(), &mut out);
    assert_eq!(
        out,
        [
            Event::Text("x".repeat(MAX_ENCODED)),
            Event::Text("second line".into())
        ]
    );
}

#[test]
fn console_bytes_become_lines_per_domain() {
    let mut dec = Decoder::new(ElfSet::default());
    let ev = |domain, bytes: &[u8]| {
        Event::Record(OwnedRecord::Console {
            domain,
            bytes: bytes.to_vec(),
        })
    };
    assert!(dec.lines(&ev(1, b"hel")).is_empty());
    assert!(dec.lines(&ev(2, b"other ")).is_empty());
    let lines = dec.lines(&ev(1, b"lo\nwor"));
    assert_eq!(lines.len(), 1);
    assert_eq!(
        (lines[0].source.as_str(), lines[0].text.as_str()),
        ("dom1", "hello")
    );
    assert_eq!(dec.lines(&ev(2, b"domain\n"))[0].text, "other domain");
}

#[test]
fn halt_and_unknown_sources_are_reported() {
    let mut dec = Decoder::new(ElfSet::default());
    let l = dec.lines(&Event::Record(OwnedRecord::Halt { status: 2 }));
    assert_eq!(dec.halt, Some(2));
    assert!(l[0].text.contains("status 2 (kernel fault)"), "{:?}", l);

    let l = dec.lines(&Event::Record(OwnedRecord::Announce {
        source: 3,
        name: "vmm".into(),
        build_id: vec![1, 2],
        wire_key: WIRE_KEY.to_bytes(),
    }));
    assert!(
        l[0].text.contains("no ELF file for source `vmm`"),
        "{:?}",
        l
    );
    let l = dec.lines(&Event::Record(OwnedRecord::Defmt {
        source: 3,
        frame: vec![1, 0],
        truncated: false,
    }));
    assert_eq!(l[0].source, "vmm");
    assert!(l[0].text.contains("no table"), "{:?}", l);
}

#[test]
fn a_foreign_wire_schema_is_named() {
    let mut dec = Decoder::new(ElfSet::default());
    let l = dec.lines(&Event::Record(OwnedRecord::Announce {
        source: 0,
        name: "kernel".into(),
        build_id: vec![],
        wire_key: [9; 8],
    }));
    assert!(
        l[0].text.contains("log wire schema 0909090909090909"),
        "{:?}",
        l
    );
    assert!(l[0].text.contains(&hex(&WIRE_KEY.to_bytes())));
}

#[test]
fn terminal_codes_are_stripped() {
    assert_eq!(strip_terminal_codes("\x1b[1;1H\x1b[2Jok\r"), "ok");
}

#[test]
fn guest_console_bytes_cannot_drive_the_host_terminal() {
    let mut dec = Decoder::new(ElfSet::default());
    let bytes = b"\x1b[2J\x1b[Hclean\rfake\x08\x07 \xe2\x80\xae\ttab\n".to_vec();
    let lines = dec.lines(&Event::Record(OwnedRecord::Console { domain: 3, bytes }));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].source, "dom3");
    assert_eq!(
        lines[0].text,
        "\\x1b[2J\\x1b[Hclean\\x0dfake\\x08\\x07 \\u{202e}\ttab"
    );
    assert!(!lines[0].to_string().contains('\x1b'));
}
