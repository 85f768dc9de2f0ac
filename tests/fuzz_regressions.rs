//! Inputs that cargo-fuzz (fuzz/, see FUZZING.md) found to panic, now clear errors. Each runs the
//! same entry point as its fuzz target.

use glm4_verify::tokenizer::GlmTokenizer;

/// `tokenizer_json`: tokenizers 0.23 `expect`s while deserialising "decoder" and a "Precompiled"
/// normalizer, and slices past a buffer while building a BPE, so these tokenizer.json files panicked
/// inside `GlmTokenizer::from_dir`.
#[test]
fn tokenizer_json_that_panicked_tokenizers_is_an_error() {
    let deep = format!("{{\"decoder\": {}{}}}", "[".repeat(200), "]".repeat(200));
    let cases: [(&str, &[u8]); 8] = [
        // The fuzzer's crash (its decoder part): raw control characters in a key inside "decoder".
        (
            "control characters in decoder",
            b"{\"decoder\": {\"type\": \"WordPiece\", \"prefix\": \"##\", \"cl\0\0\0eanup\": true}}",
        ),
        // A download cut off inside "decoder".
        ("file ends inside decoder", b"{\"decoder\":{\"type\":\"ByteLevel\","),
        ("decoder nested past the depth limit", deep.as_bytes()),
        (
            "Precompiled charsmap not base64 of a charsmap",
            b"{\"normalizer\":{\"type\":\"Precompiled\",\"precompiled_charsmap\":\"AAAA\"}}",
        ),
        // As in a real file (tokenizers issue #1645, Xenova/speecht5_tts).
        ("Precompiled charsmap null", b"{\"normalizer\":{\"type\":\"Precompiled\",\"precompiled_charsmap\":null}}"),
        (
            "Precompiled inside a Sequence",
            b"{\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"},{\"type\":\"Precompiled\"}]}}",
        ),
        ("not UTF-8", b"{\"decoder\": \"\xff\"}"),
        // A BPE merge "a" + "b" longer than every vocabulary entry: tokenizers indexed past a buffer
        // (the fuzzer's input was the seed with most of its vocabulary erased).
        (
            "BPE merge longer than the vocabulary",
            b"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[[\"a\",\"b\"]]}}",
        ),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), bytes).unwrap();
        let err = match GlmTokenizer::from_dir(dir.path()) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("tokenizer.json"), "{what}: {err}");
        assert!(err.contains("does not parse") || err.contains("cannot read"), "{what}: {err}");
    }
}
