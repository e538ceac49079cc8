//! The hook keys of `flip.toml` (`before_activate`, `after_activate`: lists of a shell command
//! or a table `{ run = "...", once = bool, timeout = "10m" }`; `rollback_on_failure`), parsed
//! with serde so a mistake is reported with the file, line and key like every other key.

use flip_deploy::{Hook, DEFAULT_HOOK_TIMEOUT};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// A list of hooks as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookList(pub Vec<Hook>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    run: String,
    #[serde(default)]
    once: bool,
    timeout: Option<String>,
}

/// One entry: a string, or a table.
struct Entry(Hook);

fn hook(run: String, once: bool, timeout: Duration) -> Result<Hook, String> {
    if run.trim().is_empty() {
        return Err("a hook's command is empty".into());
    }
    if run.contains('\0') || run.len() > flip_wire::HOOK_RUN_MAX {
        return Err(format!(
            "a hook's command must be at most {} bytes, without NUL",
            flip_wire::HOOK_RUN_MAX
        ));
    }
    Ok(Hook { run, once, timeout })
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a shell command, or a table { run = "...", once = true, timeout = "10m" }"#,
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Entry, E> {
                hook(s.to_string(), false, DEFAULT_HOOK_TIMEOUT)
                    .map(Entry)
                    .map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Entry, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let timeout = match t.timeout {
                    None => DEFAULT_HOOK_TIMEOUT,
                    Some(s) => match humantime::parse_duration(&s) {
                        Ok(d) if !d.is_zero() && d <= Duration::from_secs(24 * 3600) => d,
                        Ok(_) => {
                            return Err(de::Error::custom(format!(
                                "timeout {s:?}: must be more than 0 and at most 24h"
                            )))
                        }
                        Err(e) => {
                            return Err(de::Error::custom(format!(
                                "timeout {s:?}: {e} (write e.g. \"90s\", \"10m\", \"1h\")"
                            )))
                        }
                    },
                };
                hook(t.run, t.once, timeout)
                    .map(Entry)
                    .map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for HookList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HookList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of hooks")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HookList, A::Error> {
                let mut v = Vec::new();
                while let Some(Entry(h)) = seq.next_element()? {
                    v.push(h);
                }
                Ok(HookList(v))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A hook as `flip config` shows it: the command alone, or a table when it has options.
pub fn show(h: &Hook) -> serde_json::Value {
    if !h.once && h.timeout == DEFAULT_HOOK_TIMEOUT {
        serde_json::json!(h.run)
    } else {
        serde_json::json!({
            "run": h.run, "once": h.once,
            "timeout": humantime::format_duration(h.timeout).to_string(),
        })
    }
}

/// A hook as `flip config` prints it in its TOML: what [`show`] says, as a TOML string or
/// inline table (`{ run = "...", once = false, timeout = "1m 30s" }`), which reads back as the
/// same hook.
pub fn show_toml(h: &Hook) -> String {
    let text = |s: &str| toml::Value::from(s).to_string();
    match show(h) {
        serde_json::Value::String(run) => text(&run),
        _ => format!(
            "{{ run = {}, once = {}, timeout = {} }}",
            text(&h.run),
            h.once,
            text(&humantime::format_duration(h.timeout).to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct F {
        before_activate: HookList,
    }

    #[test]
    fn hooks_parse_as_strings_or_tables_with_a_humantime_timeout() {
        let f: F = toml::from_str(
            "before_activate = [\"php artisan config:cache\", { run = \"php artisan migrate --force\", once = true, timeout = \"10m\" }]",
        )
        .unwrap();
        assert_eq!(
            f.before_activate.0,
            vec![
                Hook {
                    run: "php artisan config:cache".into(),
                    once: false,
                    timeout: DEFAULT_HOOK_TIMEOUT
                },
                Hook {
                    run: "php artisan migrate --force".into(),
                    once: true,
                    timeout: Duration::from_secs(600)
                },
            ]
        );
    }

    #[test]
    fn a_bad_hook_table_is_refused_with_the_reason() {
        for (text, want) in [
            (
                "before_activate = [{ run = \"x\", onse = true }]",
                "unknown field `onse`",
            ),
            (
                "before_activate = [{ run = \"x\", timeout = \"soon\" }]",
                "timeout \"soon\"",
            ),
            (
                "before_activate = [{ run = \"x\", timeout = \"0s\" }]",
                "more than 0",
            ),
            ("before_activate = [\"\"]", "empty"),
            ("before_activate = [{ once = true }]", "missing field `run`"),
        ] {
            let e = toml::from_str::<F>(text).err().expect(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
