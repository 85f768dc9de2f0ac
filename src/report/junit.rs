//! JUnit XML: one testcase per sample and per finding, one suite per adapter (CI dashboards).

use quick_junit::{NonSuccessKind, Report as JReport, TestCase, TestCaseStatus, TestSuite};

use super::Report;
use crate::finding::Severity;

pub fn render(reports: &[Report]) -> anyhow::Result<String> {
    let mut jr = JReport::new("glm4-verify");
    for r in reports {
        let mut suite = TestSuite::new(r.adapter.path.clone());
        let mut verdict = if r.passed() {
            TestCase::new("verdict", TestCaseStatus::success())
        } else {
            let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
            st.set_message(format!("{}: {}", r.verdict.as_str(), r.cause));
            TestCase::new("verdict", st)
        };
        verdict.set_classname("verdict");
        suite.add_test_case(verdict);
        for f in &r.findings {
            let status = if f.severity == Severity::Error {
                let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                st.set_message(f.message.clone());
                st
            } else {
                TestCaseStatus::success()
            };
            let mut tc = TestCase::new(f.code.clone(), status);
            tc.set_classname("finding");
            tc.set_system_out(f.message.clone());
            suite.add_test_case(tc);
        }
        for x in &r.samples {
            let gained = x.logprob_tuned >= x.logprob_base;
            let status = if gained || x.target_tokens == 0 {
                TestCaseStatus::success()
            } else {
                let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                st.set_message(format!("target log p fell from {:.3} to {:.3}", x.logprob_base, x.logprob_tuned));
                st
            };
            let mut tc = TestCase::new(format!("{}:{}", x.source, x.line), status);
            tc.set_classname("sample");
            tc.set_system_out(format!(
                "target: {}\nbase:   {}\ntuned:  {}",
                x.target, x.generation_base, x.generation_tuned
            ));
            suite.add_test_case(tc);
        }
        jr.add_test_suite(suite);
    }
    Ok(jr.to_string()?)
}
