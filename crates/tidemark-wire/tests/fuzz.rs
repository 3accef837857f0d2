//! Byte-level fuzzing of everything the codec reads from a client (proptest, bounded cases so
//! it runs in CI on stable Rust; failing inputs are kept in `proptest-regressions/` as the
//! corpus): the frame codec fed arbitrary and mutated byte streams in arbitrary chunks, every
//! frontend message view, Bind values, and the startup/SSL/cancel negotiation. Nothing may
//! panic, and nothing may be accepted past its limit.

use bytes::BytesMut;
use proptest::prelude::*;
use tidemark_wire::frontend::{self as fe, FrontendMessage};
use tidemark_wire::{Frame, FrameCodec, StartupPacket};

/// Valid frontend messages, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let mut v = vec![
        fe::query("SELECT 1").raw().to_vec(),
        fe::parse("s1", "SELECT $1", &[23]).raw().to_vec(),
        fe::describe_or_close(b'D', fe::Target::Statement, "s1")
            .raw()
            .to_vec(),
        fe::describe_or_close(b'C', fe::Target::Portal, "")
            .raw()
            .to_vec(),
        fe::sync().raw().to_vec(),
        fe::parse_bytes("", b"select '\xe9'", &[]).raw().to_vec(),
    ];
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::bind(
        "",
        "s1",
        [1i16],
        [Some(7i32)],
        |v, buf| {
            if let Some(v) = v {
                postgres_protocol::types::int4_to_sql(v, buf);
            }
            Ok(postgres_protocol::IsNull::No)
        },
        [1i16],
        &mut b,
    )
    .map_err(|_| ())
    .unwrap();
    v.push(b.to_vec());
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::execute("", 0, &mut b).unwrap();
    v.push(b.to_vec());
    v
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds();
    (
        proptest::sample::select(seeds),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        any::<usize>(),
    )
        .prop_map(|(mut s, flips, cut)| {
            for (at, byte) in flips {
                let i = at % s.len();
                s[i] = byte;
            }
            let keep = cut % (s.len() + 1);
            s.truncate(keep.max(1));
            s
        })
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(mutated(), 1..6).prop_map(|v| v.concat()),
    ]
}

/// Feeds `bytes` to a codec in chunks, looking at every frame the way the proxy does.
fn feed(bytes: &[u8], chunks: &[usize], max: usize) -> Result<(), TestCaseError> {
    let codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    while at < bytes.len() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, bytes.len() - at);
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    prop_assert!(f.len() <= max, "a frame over the limit was accepted");
                    look(&f);
                }
                Ok(None) => break,
                Err(_) => return Ok(()),
            }
        }
        // Nothing is reserved far beyond what arrived.
        prop_assert!(buf.capacity() <= buf.len() + 64 * 1024 + 8 * 1024);
    }
    Ok(())
}

fn look(f: &Frame) {
    if let Ok(m) = FrontendMessage::parse(f) {
        match m {
            FrontendMessage::Bind { .. } => {
                if let Ok(v) = fe::bind_values(f) {
                    for i in 0..v.params.len() + 1 {
                        let _ = v.int_param(i);
                        let _ = v.result_format(i);
                    }
                }
                let _ = fe::rename_bind(f, "tm_x");
            }
            FrontendMessage::Parse { .. } | FrontendMessage::NonUtf8 { simple: false, .. } => {
                let _ = fe::parse_query_bytes(f);
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn frontend_codec_never_panics(bytes in stream(), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        feed(&bytes, &chunks, 10_000)?;
        feed(&bytes, &chunks, 256)?;
    }

    #[test]
    fn startup_negotiation_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), split in 0usize..200) {
        let mut buf = BytesMut::new();
        let split = split.min(bytes.len());
        buf.extend_from_slice(&bytes[..split]);
        let _ = StartupPacket::decode(&mut buf);
        buf.extend_from_slice(&bytes[split..]);
        for _ in 0..4 {
            match StartupPacket::decode(&mut buf) {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }

    #[test]
    fn startup_packets_with_parameters_never_panic(
        params in proptest::collection::vec(("[a-z_]{0,12}", ".{0,20}"), 0..6),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let mut b = BytesMut::new();
        if postgres_protocol::message::frontend::startup_message(
            params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut b,
        ).is_ok() {
            let mut v = b.to_vec();
            for (at, byte) in flips {
                let i = at % v.len();
                v[i] = byte;
            }
            let mut buf = BytesMut::from(&v[..]);
            let _ = StartupPacket::decode(&mut buf);
        }
    }
}
