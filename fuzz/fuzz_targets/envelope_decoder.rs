//! Any bytes from a bus: decoding an envelope never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_actors::Envelope;

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::decode(data);
});
