//! Id parity of the converted GLM-4 tokenizer against the `tiktoken` crate's glm4 encoding,
//! on the real glm-4-9b-chat `tokenizer.model`.

use std::path::PathBuf;
use std::sync::OnceLock;

use glm4_verify::tokenizer::tiktoken::{load_tiktoken, GLM4_SPECIAL_TOKENS};
use tokenizers::Tokenizer;

const N_RANKS: u32 = 151_329;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/glm4-tokenizer").join(name)
}

/// Converted once per test binary: it is the expensive part.
fn hf() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let start = std::time::Instant::now();
        let tok = load_tiktoken(&fixture("tokenizer.model"), Some(&fixture("tokenizer_config.json")))
            .expect("load glm4 tokenizer.model");
        eprintln!("load_tiktoken: {:?}", start.elapsed());
        tok
    })
}

/// The crate's glm4 encoding has GLM-4.5's 36 specials; the first 14 are glm-4-9b-chat's.
fn oracle() -> &'static tiktoken::CoreBpe {
    tiktoken::get_encoding("glm4").expect("tiktoken glm4 encoding")
}

fn hf_ids(text: &str) -> Vec<u32> {
    hf().encode(text, false).expect("encode").get_ids().to_vec()
}

/// Mixed text: scripts, code, emoji, line endings, whitespace runs, numbers, long repeats.
fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure they'll say it's fine, but we've seen what you'd do. DON'T. It'S OK. 'Tis",
        "  leading spaces and trailing spaces   ",
        "你好，世界！今天天气很好。",
        "GLM-4是智谱AI推出的新一代预训练模型，支持多轮对话、网页浏览、代码执行和长文本推理。",
        "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
        "中文English混合mixed文本text，标点符号「」『』《》【】……——",
        "微调后的模型在验证集上的损失从2.35降到了1.87，准确率提升了12.5%。",
        "日本語のテキストです。カタカナとひらがな。",
        "한국어 텍스트입니다.",
        "Привет, мир! Как дела?",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "Ελληνικά και Ñandú, crème brûlée, naïve façade",
        "e\u{301} vs é, Z\u{351}\u{36b}\u{343}a\u{33e}\u{357}l\u{30f}g\u{30c}o",
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
        "def f(a, b=2, *args, **kw):\n\tif a >= b and not kw:\n\t\treturn a // b  # floor\n\treturn None\n",
        "{\"model\": \"glm-4-9b-chat\", \"lora\": {\"r\": 16, \"alpha\": 32, \"dropout\": 0.05}}",
        "<div class=\"x\">&nbsp;<a href='https://example.com/a?b=1&c=2'>link</a></div>",
        "SELECT id, name FROM users WHERE age > 30 ORDER BY name DESC;",
        "x+=1;y-=2;z*=3;w/=4;a%=5;b**=6;c<<=7;d>>=8;e&&f||!g",
        "🙂",
        "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸 ❤️ ✨🎉",
        "line1\r\nline2\r\n\r\nline3\r\n",
        "a\rb\r\rc\r\r\nd",
        "\r\n",
        "\n\n\n",
        " \n \n ",
        "tabs\tand\t\tmore\t\t\ttabs",
        "mixed \t \n\t\n  \r\n \u{a0}nbsp\u{3000}ideographic\u{2028}sep\u{2029}para",
        "trailing newline then spaces\n    ",
        "   \n\n   word",
        "word   ",
        "x  y   z    w",
        "1234567890",
        "3.14159265358979 2.71828 -42 +7 1e-9 0x1F 0b1010",
        "1,000,000 and 12,345.67 and 100000000000000",
        "２０２４年１２月３１日 ٣٤٥ ³½ Ⅻ",
        "Phone: +86 138-0013-8000, date 2024-06-05T12:34:56Z",
        "\u{0}\u{1}\u{7f} \u{1b}[31mred\u{1b}[0m",
        "\u{feff}BOM and \u{200b}zero\u{200d}width",
        "'s 's 'S 'll 'LL 're 've 'm 'd 't",
        "don't won't can't shouldn't y'all",
        "...!!!???;;;:::---___===+++",
        " .  ,  !  ?",
        "",
        " ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Long runs stress the BPE merge order and the `\s+(?!\S)` lookahead.
    for unit in ["a", "哈", " ", "\n", "\r\n", "\t", "!", "😀", "ab", "0", "12", "的", " a", "  \n"] {
        for n in [2, 3, 17, 100, 513] {
            texts.push(unit.repeat(n));
        }
    }
    texts.push(format!("{}x", " ".repeat(50)));
    texts.push(format!("x{}\ny", " ".repeat(50)));
    texts.push("汉字".repeat(300) + &"abc ".repeat(200));
    texts
}

#[test]
fn tiktoken_crate_has_the_same_ranks_as_the_file() {
    // Makes the oracle trustworthy: every rank decodes to the file's bytes.
    let b64 = base64_decode_lines();
    assert_eq!(b64.len(), N_RANKS as usize);
    for (rank, bytes) in b64.iter().enumerate() {
        assert_eq!(&oracle().decode(&[rank as u32]), bytes, "rank {rank}");
    }
}

/// Token bytes by rank, read with a deliberately simple parser (independent of the loader).
fn base64_decode_lines() -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(fixture("tokenizer.model")).expect("read model");
    let mut tokens = vec![Vec::new(); N_RANKS as usize];
    for line in text.lines() {
        let (b64, rank) = line.split_once(' ').expect("two fields");
        tokens[rank.parse::<usize>().expect("rank")] =
            base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    }
    tokens
}

#[test]
fn corpus_ids_match_tiktoken() {
    let corpus = corpus();
    let mut mismatches = Vec::new();
    for text in &corpus {
        let (got, want) = (hf_ids(text), oracle().encode(text));
        if got != want {
            mismatches.push(format!("{text:?}\n  hf:       {got:?}\n  tiktoken: {want:?}"));
        }
    }
    eprintln!("{} corpus strings compared", corpus.len());
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_vocab_token_as_text_matches_tiktoken() {
    // Each token's own text (lossy where it is a partial UTF-8 sequence) must encode the
    // same; this covers all 151k merge paths, not just the ones the corpus hits.
    let mut mismatches = Vec::new();
    for rank in 0..N_RANKS {
        let text = String::from_utf8_lossy(&oracle().decode(&[rank])).into_owned();
        let (got, want) = (hf_ids(&text), oracle().encode(&text));
        if got != want {
            mismatches.push(format!("rank {rank} {text:?}: hf {got:?} tiktoken {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn random_token_concatenations_match_tiktoken() {
    // Deterministic LCG: joins of 2-9 random tokens create pre-tokens that no single
    // vocabulary entry covers, so BPE has to choose between competing merges.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let mut mismatches = Vec::new();
    for _ in 0..30_000 {
        let count = 2 + next() % 8;
        let ids: Vec<u32> = (0..count).map(|_| next() % N_RANKS).collect();
        let text = String::from_utf8_lossy(&oracle().decode(&ids)).into_owned();
        let (got, want) = (hf_ids(&text), oracle().encode(&text));
        if got != want {
            mismatches.push(format!("{text:?}: hf {got:?} tiktoken {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn readme_ids_from_python_tiktoken() {
    assert_eq!(
        hf_ids("[gMASK]<sop><|user|>\nHi<|assistant|>\nHello"),
        [151331, 151333, 151336, 198, 13041, 151337, 198, 9703]
    );
    assert_eq!(hf_ids("测试 Hello world\r\n🙂"), [100838, 21873, 1879, 319, 9281, 18504]);
}

#[test]
fn decode_round_trips() {
    for text in corpus() {
        let ids = hf_ids(&text);
        assert_eq!(hf().decode(&ids, false).expect("decode"), text);
    }
    let chat = "[gMASK]<sop><|user|>\n你好<|assistant|>\nHi 🙂<|endoftext|>";
    let ids = hf_ids(chat);
    assert_eq!(hf().decode(&ids, false).expect("decode"), chat);
    assert_eq!(hf().decode(&ids, true).expect("decode"), "\n你好\nHi 🙂");
}

#[test]
fn special_tokens_have_glm4_ids() {
    let tok = hf();
    assert_eq!(tok.get_vocab_size(true), N_RANKS as usize + 14);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_config.json")).expect("read config"))
            .expect("parse config");
    let decoder = config["added_tokens_decoder"].as_object().expect("added_tokens_decoder");
    assert_eq!(decoder.len(), GLM4_SPECIAL_TOKENS.len());

    // Without a config the built-in list must give the same ids.
    let fallback = load_tiktoken(&fixture("tokenizer.model"), None).expect("load");
    for (i, name) in GLM4_SPECIAL_TOKENS.iter().enumerate() {
        let id = N_RANKS + i as u32;
        assert_eq!(decoder[&id.to_string()]["content"], *name);
        assert_eq!(tok.token_to_id(name), Some(id), "{name}");
        assert_eq!(tok.id_to_token(id).as_deref(), Some(*name));
        assert_eq!(fallback.token_to_id(name), Some(id), "{name}");
        // Inside text they are recognised as one id, as tiktoken does with specials allowed.
        let text = format!("a{name}b");
        assert_eq!(hf_ids(&text), oracle().encode_with_special_tokens(&text));
        assert_eq!(hf_ids(&text)[1], id);
    }
    assert!(tok.get_added_tokens_decoder().values().all(|t| t.special && !t.normalized));
}

/// The original glm-4-9b-chat directory layout (tokenizer.model + tokenizer_config.json with its chat
/// template) through the same entry point as tokenizer.json models.
#[test]
fn glm4_chat_tokenizer_dir_renders_and_labels() {
    use glm4_verify::data::Message;
    use glm4_verify::tokenizer::recipe::{encode, Recipe};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/glm4-tokenizer");
    let tok = glm4_verify::tokenizer::GlmTokenizer::from_dir(&dir).expect("loads");
    let msg = |role: &str, content: &str| Message { role: role.into(), content: content.into(), tools: None };
    let conv = [msg("user", "你好"), msg("assistant", "你好！有什么可以帮你？")];
    let ids = tok.apply_chat_template(&conv[..1], true).expect("renders");
    assert_eq!(&ids[..3], &[151331, 151333, 151336], "[gMASK]<sop><|user|>");
    assert_eq!(*ids.last().unwrap(), 151337, "<|assistant|>");
    let e = encode(&tok, &conv, &Recipe::default()).expect("labels");
    assert_eq!(e.input_ids[..ids.len()], ids[..]);
    assert_eq!(*e.labels.last().unwrap(), 151336, "the appended <|user|> is trained");
    assert_eq!(e.labels[..ids.len()].iter().filter(|&&l| l != -100).count(), 0);
}
