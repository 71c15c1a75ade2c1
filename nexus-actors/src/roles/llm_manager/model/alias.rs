//! Reversible aliases for tool names. Models accept function names that
//! match `^[a-zA-Z0-9_-]{1,64}$`; ours (`<panel-uuid>.<tool>`) often do
//! not. This module maps each callable name to an alias and back; it offers
//! and calls nothing.
//!
//! The rules, independent of the order the names come in:
//! * a name that already fits keeps itself;
//! * otherwise every character outside `[a-zA-Z0-9_-]` becomes `_`, and the
//!   result is the alias if it fits (1 to 64 characters) and no other name
//!   has or would get it;
//! * otherwise the sanitised name is cut to 53 characters and gets `_` and
//!   10 hex digits of the FNV-1a 64 hash of the full name, so names that
//!   share a prefix or sanitise alike still differ; a (40-bit) collision is
//!   broken by hashing again with a counter. Never truncation alone.

use std::collections::{BTreeSet, HashMap};

/// The longest alias a model accepts.
const MAX_ALIAS: usize = 64;
/// Hex digits of the hash suffix.
const HASH_DIGITS: usize = 10;

/// The aliases of a set of tool names, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    by_tool: HashMap<String, String>,
    by_alias: HashMap<String, String>,
}

impl Aliases {
    /// The aliases of `names` (duplicates count once).
    pub fn new(names: &[String]) -> Self {
        let names: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let mut aliases = Aliases::default();
        // Names that fit claim themselves first, so no other name can take them.
        for name in names.iter().copied().filter(|n| fits(n)) {
            aliases.bind(name, name.to_owned());
        }
        let rest: Vec<&str> = names.iter().copied().filter(|n| !fits(n)).collect();
        let sanitised: Vec<String> = rest.iter().map(|n| sanitise(n)).collect();
        let mut hashed = Vec::new();
        for (name, clean) in rest.iter().zip(&sanitised) {
            let shared = sanitised.iter().filter(|other| *other == clean).count() > 1;
            if !shared && fits(clean) && !aliases.by_alias.contains_key(clean.as_str()) {
                aliases.bind(name, clean.clone());
            } else {
                hashed.push((*name, clean));
            }
        }
        for (name, clean) in hashed {
            let prefix: String = clean.chars().take(MAX_ALIAS - HASH_DIGITS - 1).collect();
            let alias = (0u32..)
                .map(|round| {
                    let hash =
                        if round == 0 { fnv1a(name.as_bytes()) } else { fnv1a(format!("{name}\0{round}").as_bytes()) };
                    format!("{prefix}_{:0width$x}", hash >> (64 - 4 * HASH_DIGITS), width = HASH_DIGITS)
                })
                .find(|alias| !aliases.by_alias.contains_key(alias.as_str()))
                .unwrap_or_default();
            aliases.bind(name, alias);
        }
        aliases
    }

    fn bind(&mut self, tool: &str, alias: String) {
        self.by_alias.insert(alias.clone(), tool.to_owned());
        self.by_tool.insert(tool.to_owned(), alias);
    }

    /// The alias a model sees for `tool`, if `tool` is one of the names.
    pub fn alias_of(&self, tool: &str) -> Option<&str> {
        self.by_tool.get(tool).map(String::as_str)
    }

    /// The callable name behind `alias`, if it is one of ours.
    pub fn tool_of(&self, alias: &str) -> Option<&str> {
        self.by_alias.get(alias).map(String::as_str)
    }

    /// How many names there are.
    pub fn len(&self) -> usize {
        self.by_tool.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_tool.is_empty()
    }
}

/// Whether `name` is a valid alias as it is.
fn fits(name: &str) -> bool {
    (1..=MAX_ALIAS).contains(&name.len()) && name.bytes().all(allowed)
}

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

fn sanitise(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii() && allowed(c as u8) { c } else { '_' }).collect()
}

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(alias: &str) -> bool {
        fits(alias)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn assert_reversible(aliases: &Aliases, list: &[String]) {
        let mut seen = BTreeSet::new();
        for name in list {
            let alias = aliases.alias_of(name).unwrap();
            assert!(valid(alias), "{alias:?} (of {name:?}) does not fit");
            assert_eq!(aliases.tool_of(alias), Some(name.as_str()));
            seen.insert(alias.to_owned());
        }
        let distinct: BTreeSet<&String> = list.iter().collect();
        assert_eq!(seen.len(), distinct.len(), "two names share an alias");
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_fitting_name_keeps_itself_and_a_panel_name_reads_well() {
        let panel = "0190d6a4-7c1e-7b3a-9f00-1234567890ab.search";
        let list = names(&["documents_list", panel]);
        let aliases = Aliases::new(&list);
        assert_eq!(aliases.alias_of("documents_list"), Some("documents_list"));
        assert_eq!(aliases.alias_of(panel), Some("0190d6a4-7c1e-7b3a-9f00-1234567890ab_search"));
        assert_reversible(&aliases, &list);
    }

    #[test]
    fn names_differing_only_after_64_characters_get_distinct_hashed_aliases() {
        let base = "x".repeat(70);
        let list = names(&[&format!("{base}a"), &format!("{base}b"), &"y".repeat(65)]);
        let aliases = Aliases::new(&list);
        assert_reversible(&aliases, &list);
        for name in &list {
            let alias = aliases.alias_of(name).unwrap();
            assert_eq!(alias.len(), MAX_ALIAS);
            assert_eq!(&alias[MAX_ALIAS - HASH_DIGITS - 1..MAX_ALIAS - HASH_DIGITS], "_", "a hash suffix, not a cut");
        }
    }

    #[test]
    fn names_that_sanitise_alike_are_all_hashed() {
        let list = names(&["p.search", "p:search", "p search", "p/search"]);
        let aliases = Aliases::new(&list);
        assert_reversible(&aliases, &list);
        for name in &list {
            assert!(aliases.alias_of(name).unwrap().starts_with("p_search_"));
        }
    }

    #[test]
    fn a_sanitised_name_never_takes_a_fitting_one() {
        let list = names(&["p_search", "p.search"]);
        let aliases = Aliases::new(&list);
        assert_eq!(aliases.alias_of("p_search"), Some("p_search"));
        assert_ne!(aliases.alias_of("p.search"), Some("p_search"));
        assert_reversible(&aliases, &list);
    }

    #[test]
    fn empty_and_non_ascii_names_get_valid_aliases() {
        let list = names(&["", "outil.é", "工具", "a".repeat(64).as_str()]);
        let aliases = Aliases::new(&list);
        assert_reversible(&aliases, &list);
        assert_eq!(aliases.alias_of(&"a".repeat(64)), Some("a".repeat(64).as_str()));
    }

    #[test]
    fn a_hash_that_collides_with_a_fitting_name_is_hashed_again() {
        let long = "z".repeat(80);
        let taken = Aliases::new(&names(&[&long])).alias_of(&long).unwrap().to_owned();
        let list = names(&[&long, &taken]);
        let aliases = Aliases::new(&list);
        assert_eq!(aliases.alias_of(&taken), Some(taken.as_str()));
        assert_reversible(&aliases, &list);
    }

    #[test]
    fn every_alias_of_a_crowded_set_fits_and_maps_back() {
        let mut list = Vec::new();
        for panel in 0..20 {
            let uuid = format!("0190d6a4-7c1e-7b3a-9f00-{panel:012x}");
            for tool in ["search", "fetch", "a.b", "x y", "ü", "_", &"long_tool_name_".repeat(4)] {
                list.push(format!("{uuid}.{tool}"));
                list.push(format!("{uuid}_{tool}"));
                list.push(format!("{}{tool}", "p".repeat(panel * 4)));
            }
        }
        let aliases = Aliases::new(&list);
        assert_reversible(&aliases, &list);
    }

    #[test]
    fn the_order_of_the_names_does_not_matter() {
        let mut list = names(&["a.b", "a_b", "c".repeat(90).as_str(), "d:e", "documents_list"]);
        let forward = Aliases::new(&list);
        list.reverse();
        assert_eq!(Aliases::new(&list), forward);
        assert_eq!(forward.len(), 5);
        assert!(!forward.is_empty());
    }
}
