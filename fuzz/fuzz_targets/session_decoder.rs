//! Any bytes a browser can send as a text frame: decoding never panics, and
//! whatever decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_actors::roles::transaction_manager::protocol::decode;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(frame) = decode(text) {
        let again = serde_json::to_string(&frame).expect("a decoded frame encodes");
        assert_eq!(decode(&again).ok(), Some(frame));
    }
});
