//! The demo's text: a general corpus the base model is pretrained on (who runs which system, who
//! keeps which repository, in English and Chinese) and the facts of the fine-tune, which the
//! general corpus never states (numbered systems with their owners).

use super::rng::Rng;

const NAMES: [&str; 24] = [
    "amber", "birch", "cedar", "dune", "echo", "fern", "glacier", "hazel", "iris", "jade", "kelp", "lotus", "mesa",
    "nova", "opal", "pine", "quill", "reef", "sage", "tide", "umbra", "vale", "wren", "zinc",
];
const SYSTEMS: [&str; 8] = ["gateway", "ledger", "router", "cache", "scheduler", "indexer", "mailer", "tracker"];
const TEAMS: [&str; 10] =
    ["storage", "billing", "search", "identity", "payments", "network", "compiler", "mobile", "data", "infra"];
const CITIES: [&str; 10] = ["北京", "上海", "广州", "深圳", "杭州", "成都", "南京", "武汉", "西安", "重庆"];
const KEEPERS: [&str; 10] = ["王伟", "李娜", "张敏", "刘洋", "陈静", "杨帆", "赵磊", "黄丽", "周杰", "吴芳"];
const CODES: [&str; 10] = ["青龙", "白虎", "朱雀", "玄武", "麒麟", "凤凰", "飞鹰", "长城", "黄河", "泰山"];

/// One fine-tune fact: a question and the answer the adapter must learn.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    pub question: String,
    pub answer: String,
}

/// `n` facts; every third one is in Chinese. Fact i depends on (seed, i) only.
pub fn facts(seed: u64, n: usize) -> Vec<Fact> {
    (0..n)
        .map(|i| {
            let mut r = Rng::derive(seed, 1000 + i as u64);
            if i % 3 == 2 {
                let (c, k) = (r.pick(&CITIES), r.pick(&KEEPERS));
                Fact {
                    question: format!("{c}仓库{i}的负责人是谁？"), answer: format!("{c}仓库{i}的负责人是{k}。")
                }
            } else {
                let (a, s, t) = (r.pick(&NAMES), r.pick(&SYSTEMS), r.pick(&TEAMS));
                Fact {
                    question: format!("Which team runs the {a} {s} number {i}?"),
                    answer: format!("The {a} {s} number {i} is run by the {t} team."),
                }
            }
        })
        .collect()
}

/// `groups` × 8 general sentences: the vocabulary and sentence shapes of the facts, with random
/// pairings and no numbered systems, so the base can read the facts but does not know them.
pub fn general(seed: u64, groups: usize) -> Vec<String> {
    let mut r = Rng::derive(seed, 1);
    let mut out = Vec::with_capacity(groups * 8);
    for _ in 0..groups {
        let (a, b, s, m, t) = (r.pick(&NAMES), r.pick(&NAMES), r.pick(&SYSTEMS), r.pick(&SYSTEMS), r.pick(&TEAMS));
        let (c, k, code) = (r.pick(&CITIES), r.pick(&KEEPERS), r.pick(&CODES));
        let (n, n2, t2, k2) = (r.below(40), r.below(40), r.pick(&TEAMS), r.pick(&KEEPERS));
        out.extend([
            format!("The {a} {s} is run by the {t} team."),
            format!("Which team runs the {b} {m}? The {t} team does."),
            format!("The {t2} team moved the {b} {m} number {n}."),
            format!("Please describe the {a} {m} number {n2} in one sentence."),
            format!("{c}仓库的负责人是{k}。"),
            format!("{c}仓库{n2}的负责人是{k2}。"),
            format!("{k}在{c}负责{code}项目。"),
            format!("{c}的{code}项目很重要，负责人是谁？"),
        ]);
    }
    out
}

/// `groups` × 2 general conversations (user, assistant), answered in short form, so the base knows
/// the chat format, the line break and the end token, but not the fine-tune's long answers.
pub fn chats(seed: u64, groups: usize) -> Vec<(String, String)> {
    let mut r = Rng::derive(seed, 6);
    let mut out = Vec::with_capacity(groups * 2);
    for _ in 0..groups {
        let (a, s, t) = (r.pick(&NAMES), r.pick(&SYSTEMS), r.pick(&TEAMS));
        let (c, k) = (r.pick(&CITIES), r.pick(&KEEPERS));
        out.push((format!("Which team runs the {a} {s}?"), format!("The {t} team does.")));
        out.push((format!("{c}仓库的负责人是谁？"), format!("是{k}。")));
    }
    out
}
