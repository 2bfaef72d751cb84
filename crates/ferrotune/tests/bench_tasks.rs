//! Task files for `ferrotune bench`: every shipped task parses, the hub tasks (which cannot be
//! fetched here) build the prompts lm-eval's Python builds for a hand-written document, and bad
//! task files fail with one line naming the file, the key, the field or the place looked in.
use ferrotune::bench::prompt::Prompter;
use ferrotune::bench::task::{self, OutputType, TaskFile, SHIPPED};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

fn doc(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn shipped(name: &str) -> task::TaskConfig {
    let (tasks, _) = task::resolve_tasks(name).unwrap();
    assert_eq!(tasks.len(), 1);
    tasks.into_iter().next().unwrap()
}

fn tmp_yaml(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-bench-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_shipped_task_parses() {
    for (name, _) in SHIPPED {
        let t = shipped(name);
        assert_eq!(&t.task, name);
        assert!(!t.metric_list.is_empty(), "{name}");
    }
    assert_eq!(shipped("sst2").output_type, OutputType::MultipleChoice);
    assert_eq!(shipped("dialogsum").output_type, OutputType::GenerateUntil);
}

#[test]
fn hub_tasks_build_lm_evals_prompts() {
    // arc_easy: the target is the index of answerKey among the labels; choices a list.
    let t = shipped("arc_easy");
    let d = doc(
        json!({"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}),
    );
    let p = Prompter::new(&t, &d).unwrap();
    assert_eq!(
        p.contexts(&d, 0, &[], None).unwrap(),
        vec!["Question: Which is a gas?\nAnswer:"]
    );
    assert_eq!(
        p.choices(&d, 0, false).unwrap(),
        vec!["ice", "steam", "rock"]
    );
    assert_eq!(p.target(&d, 0, false).unwrap(), json!(1));

    // winogrande: each choice is a context, the rest of the sentence the shared continuation.
    let t = shipped("winogrande");
    let d = doc(
        json!({"sentence": "The trophy doesn't fit in the suitcase because _ is too big.", "option1": "the trophy", "option2": "the suitcase", "answer": "2"}),
    );
    let p = Prompter::new(&t, &d).unwrap();
    assert!(p.multiple_input);
    assert_eq!(p.text(&d, 0, false).unwrap(), json!(1));
    assert_eq!(
        p.contexts(&d, 0, &[], None).unwrap(),
        vec![
            "The trophy doesn't fit in the suitcase because the trophy",
            "The trophy doesn't fit in the suitcase because the suitcase"
        ]
    );
    assert_eq!(p.target(&d, 0, false).unwrap(), json!("is too big."));

    // hellaswag: lm-eval's preprocess (strip, " [title]" -> ". ", drop [markup], "  " -> " ").
    let t = shipped("hellaswag");
    let d = doc(
        json!({"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow [header] covering the window.", "ctx_b": "then", "endings": [" the man adds wax [title]to the car.", ", the man stops."], "label": "1"}),
    );
    let p = Prompter::new(&t, &d).unwrap();
    // Python: preprocess("Removing ice from car: " + ctx_a + " " + "then".capitalize())
    assert_eq!(
        p.contexts(&d, 0, &[], None).unwrap(),
        vec!["Removing ice from car: Then, the man writes over the snow covering the window. Then"]
    );
    assert_eq!(
        p.choices(&d, 0, false).unwrap(),
        vec!["the man adds wax. to the car.", ", the man stops."]
    );
    assert_eq!(p.target(&d, 0, false).unwrap(), json!(1));

    // mmlu: the description in front, question stripped, lettered choices.
    let t = shipped("mmlu_abstract_algebra");
    let d = doc(
        json!({"question": " Find the order of 2 in Z_4. ", "choices": ["1", "2", "3", "4"], "answer": 1}),
    );
    let p = Prompter::new(&t, &d).unwrap();
    assert_eq!(
        p.contexts(&d, 0, &[], None).unwrap(),
        vec!["The following are multiple choice questions (with answers) about abstract algebra.\n\nFind the order of 2 in Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"]
    );
    // One first_n shot: question, " " + answer letter, "\n\n".
    let shot = doc(
        json!({"question": "Is Z_2 a group?", "choices": ["yes", "no", "maybe", "never"], "answer": 0}),
    );
    let ctx = p.contexts(&d, 0, &[(0, &shot)], None).unwrap();
    assert!(
        ctx[0].contains(
            "Is Z_2 a group?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer: A\n\nFind the order"
        ),
        "{}",
        ctx[0]
    );

    // piqa: a list built in the template.
    let t = shipped("piqa");
    let d = doc(
        json!({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Freeze it.", "label": 0}),
    );
    let p = Prompter::new(&t, &d).unwrap();
    assert_eq!(
        p.choices(&d, 0, false).unwrap(),
        vec!["Twist the lid.", "Freeze it."]
    );
}

#[test]
fn an_unsupported_key_names_the_key_and_the_file() {
    let p = tmp_yaml(
        "bad_key.yaml",
        "task: x\ndataset_path: json\nprocess_docs: foo\n",
    );
    let e = match task::parse_task_file(&p, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(
        e.contains("process_docs") && e.contains("bad_key.yaml") && !e.contains('\n'),
        "{e}"
    );
    let p = tmp_yaml(
        "func.yaml",
        "task: x\ndataset_path: json\ndoc_to_text: !function utils.doc_to_text\n",
    );
    let e = task::parse_task_file(&p, None).err().unwrap().to_string();
    assert!(
        e.contains("doc_to_text") && e.contains("!function") && e.contains("line 3"),
        "{e}"
    );
    let p = tmp_yaml("metric.yaml", "task: x\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_choice: [a, b]\nmetric_list:\n  - metric: bertscore\n");
    let e = task::parse_task_file(&p, None).err().unwrap().to_string();
    assert!(
        e.contains("metric_list[0].metric") && e.contains("bertscore"),
        "{e}"
    );
    let e = task::resolve_tasks("no_such_task")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no_such_task") && e.contains("sst2"), "{e}");
}

#[test]
fn a_template_reading_a_missing_field_names_the_field_and_the_sample() {
    let p = tmp_yaml("missing_field.yaml", "task: x\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: \"Q: {{question}}\"\ndoc_to_target: answer\n");
    let t = one_task(&p);
    let good = doc(json!({"question": "q", "answer": "a"}));
    let bad = doc(json!({"query": "q", "answer": "a"}));
    let pr = Prompter::new(&t, &good).unwrap();
    let e = pr.contexts(&bad, 7, &[], None).err().unwrap().to_string();
    assert!(
        e.contains("sample 7") && e.contains("`question`") && e.contains("missing_field.yaml"),
        "{e}"
    );
}

#[test]
fn data_that_cannot_be_found_says_where_it_looked() {
    let p = tmp_yaml(
        "nodata.yaml",
        "task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere/data.jsonl\ntest_split: test\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n",
    );
    let t = one_task(&p);
    let e = ferrotune::bench::docs::load_split(&t, "test")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("nowhere/data.jsonl")
            && e.contains("looked in")
            && e.contains(&p.parent().unwrap().display().to_string()),
        "{e}"
    );
}

/// The task a task file (not a group file) at `p` describes.
fn one_task(p: &std::path::Path) -> task::TaskConfig {
    match task::parse_task_file(p, None).unwrap() {
        TaskFile::Task(t) => *t,
        TaskFile::Group(_) => panic!("{}: a group", p.display()),
    }
}

fn parse_err(name: &str, text: &str) -> String {
    let p = tmp_yaml(name, text);
    match task::parse_task_file(&p, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{name} was accepted"),
    }
}

#[test]
fn malformed_values_name_their_key_and_include_cycles_are_named() {
    let base = "task: x\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: q\n";
    let e = parse_err(
        "until.yaml",
        &format!("{base}generation_kwargs:\n  until: 3\n"),
    );
    assert!(
        e.contains("generation_kwargs.until") && !e.contains("enum"),
        "{e}"
    );
    let e = parse_err(
        "df.yaml",
        &format!("{base}dataset_kwargs:\n  data_files:\n    test: 5\n"),
    );
    assert!(e.contains("data_files.test") && !e.contains("enum"), "{e}");
    let e = parse_err("ml.yaml", &format!("{base}metric_list: [exact_match]\n"));
    assert!(e.contains("metric_list[0]") && !e.contains("struct"), "{e}");
    let e = parse_err(
        "mgt.yaml",
        &format!("{base}generation_kwargs:\n  max_gen_toks: 1000000000\n"),
    );
    assert!(
        e.contains("max_gen_toks") && e.contains("expected 1 to"),
        "{e}"
    );
    tmp_yaml("cyc_b.yaml", "include: cyc_a.yaml\n");
    let e = parse_err("cyc_a.yaml", "include: cyc_b.yaml\ntask: x\n");
    assert!(
        e.contains("a cycle") && e.contains("cyc_a.yaml -> ") && !e.contains('\n'),
        "{e}"
    );
    // A byte-order mark is not a second YAML document.
    let p = tmp_yaml("bom.yaml", &format!("\u{feff}{base}doc_to_target: a\n"));
    assert!(task::parse_task_file(&p, None).is_ok());
    for (kv, key) in [
        ("temperature: -5", "generation_kwargs.temperature"),
        ("top_p: 7", "generation_kwargs.top_p"),
        ("top_k: 0", "generation_kwargs.top_k"),
    ] {
        let e = parse_err(
            "gk.yaml",
            &format!("{base}generation_kwargs:\n  do_sample: true\n  {kv}\n"),
        );
        assert!(e.contains("gk.yaml") && e.contains(key), "{e}");
    }
    for (entry, key) in [
        (
            "weight_by_size: \"yes\"",
            "aggregate_metric_list[0].weight_by_size",
        ),
        ("bogus_key: 1", "aggregate_metric_list[0].bogus_key"),
    ] {
        let e = parse_err(
            "grp.yaml",
            &format!(
                "group: g\ntask:\n  - x\naggregate_metric_list:\n  - metric: acc\n    {entry}\n"
            ),
        );
        assert!(e.contains("grp.yaml") && e.contains(key), "{e}");
    }
    // 400,000 nested `[`: refused by line before the parser's scan (which took minutes)
    let t0 = std::time::Instant::now();
    let e = parse_err(
        "deep.yaml",
        &format!("{base}metadata: {}\n", "[".repeat(400_000)),
    );
    assert!(
        e.contains("deep.yaml") && e.contains("line 5") && e.contains("nested more than"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 10, "{:?}", t0.elapsed());
}

#[test]
fn a_data_file_that_is_a_device_is_named_as_one() {
    let p = tmp_yaml(
        "devzero.yaml",
        "task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /dev/zero\ntest_split: test\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n",
    );
    let t = one_task(&p);
    let e = ferrotune::bench::docs::load_split(&t, "test")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/dev/zero") && e.contains("device"), "{e}");
}

#[test]
fn a_template_that_loops_too_long_fails_instead_of_hanging() {
    let p = tmp_yaml(
        "loop.yaml",
        "task: x\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: \"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{q}}\"\ndoc_to_target: a\n",
    );
    let t = one_task(&p);
    let d = doc(json!({"q": "q", "a": "a"}));
    let pr = Prompter::new(&t, &d).unwrap();
    let t0 = std::time::Instant::now();
    let e = pr.contexts(&d, 0, &[], None).err().unwrap().to_string();
    assert!(
        e.contains("doc_to_text") && e.contains("steps of work"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}

#[test]
fn few_shot_examples_that_add_up_past_the_prompt_cap_are_refused() {
    let p = tmp_yaml(
        "bigshots.yaml",
        "task: x\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: a\n",
    );
    let t = one_task(&p);
    // each 1 MiB (under the per-render cap), 20 of them past the 16 MiB of a prompt
    let big = doc(json!({"q": "w ".repeat(1 << 19), "a": "a"}));
    let d = doc(json!({"q": "q", "a": "a"}));
    let pr = Prompter::new(&t, &d).unwrap();
    let shots: Vec<(usize, &Map<String, Value>)> = (0..20).map(|i| (i, &big)).collect();
    let e = pr.contexts(&d, 3, &shots, None).err().unwrap().to_string();
    assert!(
        e.contains("num_fewshot") && e.contains("sample 3") && e.contains("20 few-shot"),
        "{e}"
    );
    // a few of them fit
    assert_eq!(pr.contexts(&d, 3, &shots[..4], None).unwrap().len(), 1);
}

#[test]
fn an_inline_group_member_follows_its_include() {
    tmp_yaml(
        "inl_base.yaml",
        "dataset_path: json\noutput_type: generate_until\ndoc_to_text: \"Q: {{q}}\"\ndoc_to_target: a\n",
    );
    let p = tmp_yaml(
        "inl_group.yaml",
        "group: g\ntask:\n  - task: inl\n    include: inl_base.yaml\n    doc_to_target: b\n",
    );
    let g = match task::parse_task_file(&p, None).unwrap() {
        TaskFile::Group(g) => g,
        TaskFile::Task(_) => panic!("a task"),
    };
    let task::GroupMember::Inline(t) = &g.members[0] else {
        panic!("an inline member")
    };
    assert_eq!(t.dataset_path, "json");
    assert_eq!(t.doc_to_text, Some(json!("Q: {{q}}")));
    assert_eq!(
        t.doc_to_target,
        Some(json!("b")),
        "the member's own key wins"
    );
    let e = parse_err(
        "inl_bad.yaml",
        "group: g\ntask:\n  - task: inl\n    include: nosuch.yaml\n",
    );
    assert!(
        e.contains("task[0].include") && e.contains("nosuch.yaml"),
        "{e}"
    );
}
