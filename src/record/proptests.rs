//! Property tests over record decoding and name/header validation: arbitrary
//! bytes and strings give a typed error (or a value), never a panic.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

/// The rule `validate_name` enforces, written independently.
fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_RUN_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
}

fn outcome_record() -> impl Strategy<Value = OutcomeRecord> {
    (
        "[a-z0-9]{0,12}",
        prop_oneof![
            Just(TerminalStatus::Succeeded),
            Just(TerminalStatus::Failed),
            Just(TerminalStatus::Cancelled)
        ],
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        proptest::option::of(".{0,40}"),
        proptest::collection::hash_map(".{0,8}", ".{0,8}", 0..4),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(workflow, status, result, error, headers, final_step, finished_at_ms)| {
                OutcomeRecord {
                    workflow,
                    status,
                    result,
                    error,
                    headers,
                    final_step,
                    finished_at_ms,
                    reruns: final_step % 3,
                }
            },
        )
}

/// Headers drawn from a small alphabet of keys, so that the reserved ones
/// and the step headers come up often, with arbitrary values.
fn headers() -> impl Strategy<Value = HashMap<String, String>> {
    let key = prop_oneof![
        Just(HEADER_RUN_ID.to_string()),
        Just(HEADER_STEP.to_string()),
        Just(HEADER_WORKFLOW.to_string()),
        Just(HEADER_ATTEMPTS_BEFORE.to_string()),
        Just("workflow.other".to_string()),
        "[a-z.]{0,12}",
        ".{0,12}",
    ];
    let value = prop_oneof![
        "[0-9]{1,11}",
        "[A-Za-z0-9._:-]{1,20}",
        ".{0,200}",
        "-?[0-9]{1,3}"
    ];
    proptest::collection::hash_map(key, value, 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_decode_to_a_record_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let key = b"wm/q/run/x";
        for result in [
            decode::<RunRecord>(key, &bytes).map(|_| ()),
            decode::<SubmitRecord>(key, &bytes).map(|_| ()),
            decode::<OutcomeRecord>(key, &bytes).map(|_| ()),
        ] {
            match result {
                Ok(()) | Err(Error::CorruptRecord { .. }) | Err(Error::UnsupportedRecordVersion { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
            }
        }
    }

    #[test]
    fn records_round_trip(step in any::<u32>(), job_id in ".{0,40}", outcome in outcome_record()) {
        let run = RunRecord { step, job_id };
        prop_assert_eq!(decode::<RunRecord>(b"k", &encode(b"k", &run).unwrap()).unwrap(), run);
        let bytes = encode(b"k", &outcome).unwrap();
        prop_assert_eq!(decode::<OutcomeRecord>(b"k", &bytes).unwrap(), outcome);
    }

    #[test]
    fn any_other_version_is_refused_by_name(version in any::<u8>(), step in any::<u32>()) {
        let bytes = rmp_serde::to_vec_named(&(version, RunRecord { step, job_id: "j".into() })).unwrap();
        match decode::<RunRecord>(b"wm/q/run/r", &bytes) {
            Ok(run) => {
                prop_assert_eq!(version, RECORD_VERSION);
                prop_assert_eq!(run.step, step);
            }
            Err(Error::UnsupportedRecordVersion { key, found, supported }) => {
                prop_assert_eq!(key, "wm/q/run/r");
                prop_assert_eq!(found, version);
                prop_assert_eq!(supported, RECORD_VERSION);
            }
            Err(other) => prop_assert!(false, "unexpected error: {other}"),
        }
    }

    #[test]
    fn truncated_records_are_corrupt_not_a_panic(outcome in outcome_record(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(b"k", &outcome).unwrap();
        let cut = cut.index(bytes.len());
        let decoded = decode::<OutcomeRecord>(b"k", &bytes[..cut]);
        prop_assert!(matches!(decoded, Err(Error::CorruptRecord { .. })), "{decoded:?}");
    }

    #[test]
    fn names_are_accepted_exactly_by_the_rule(name in prop_oneof![".{0,140}", "[A-Za-z0-9._:-]{0,140}"]) {
        let checked = validate_name("run id", &name);
        prop_assert_eq!(checked.is_ok(), is_valid_name(&name), "{:?}: {:?}", name, checked);
        if let Err(e) = checked {
            prop_assert!(matches!(e, Error::InvalidRunId { what: "run id", .. }), "{}", e);
            // The message is bounded however long the input.
            prop_assert!(e.to_string().len() < 1_200);
        }
    }

    #[test]
    fn submitted_headers_are_checked(headers in headers()) {
        let reserved = headers.keys().any(|k| k.starts_with(RESERVED_HEADER_PREFIX));
        let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        match validate_headers(&headers) {
            Ok(()) => prop_assert!(!reserved && size <= MAX_HEADERS_BYTES),
            Err(Error::ReservedHeaderInSubmit(key)) => {
                prop_assert!(key.starts_with(RESERVED_HEADER_PREFIX));
                prop_assert!(headers.contains_key(&key));
            }
            Err(Error::PayloadTooLarge { what: "headers", .. }) => prop_assert!(size > MAX_HEADERS_BYTES),
            Err(other) => prop_assert!(false, "unexpected error: {other}"),
        }
        // The submitter's view of a step job's headers never has reserved keys.
        prop_assert!(user_headers(&headers).keys().all(|k| !k.starts_with(RESERVED_HEADER_PREFIX)));
    }

    #[test]
    fn step_headers_parse_or_say_why(headers in headers()) {
        match parse_step_headers(&headers) {
            Ok((run_id, step)) => {
                prop_assert!(is_valid_name(run_id));
                prop_assert_eq!(headers[HEADER_STEP].parse::<u32>().ok(), Some(step));
            }
            Err(why) => prop_assert!(why.contains("workflow."), "{}", why),
        }
        match parse_step_extras(&headers) {
            Ok((workflow, _)) => prop_assert!(is_valid_name(workflow)),
            Err(why) => prop_assert!(why.contains("workflow."), "{}", why),
        }
    }

    #[test]
    fn reasons_are_cut_to_fit(reason in ".{0,64}", repeat in 0usize..8_000) {
        let long = reason.repeat(repeat);
        let cut = bounded_reason(long.clone());
        if long.len() <= MAX_RESULT_BYTES {
            prop_assert_eq!(cut, long);
        } else {
            prop_assert!(cut.len() <= MAX_RESULT_BYTES + "… (truncated)".len());
            let kept = cut.trim_end_matches("… (truncated)");
            prop_assert!(long.starts_with(kept));
        }
    }
}
