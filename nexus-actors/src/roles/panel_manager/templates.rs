//! The panel templates built into the binary, the only `source` a panel may
//! name (`template:<name>`).
//!
//! It owns the list of templates and writing one into a fresh directory; it
//! never reads host paths, so a `source` cannot expose host files.

use std::path::Path;

use super::driver::DriverError;

/// One file of a template: its name in the panel's code dir and its text.
type TemplateFile = (&'static str, &'static str);

const PYTHON_MINIMAL: &[TemplateFile] = &[
    ("server.py", include_str!("../../../../panel-sdk-docs/python_minimal/server.py")),
    ("README.md", include_str!("../../../../panel-sdk-docs/python_minimal/README.md")),
    ("nexus-panel.json", include_str!("../../../../panel-sdk-docs/python_minimal/nexus-panel.json")),
];

const NODE_MINIMAL: &[TemplateFile] = &[
    ("server.js", include_str!("../../../../panel-sdk-docs/node_minimal/server.js")),
    ("README.md", include_str!("../../../../panel-sdk-docs/node_minimal/README.md")),
    ("nexus-panel.json", include_str!("../../../../panel-sdk-docs/node_minimal/nexus-panel.json")),
];

/// No files: the owner writes or uploads them.
const EMPTY: &[TemplateFile] = &[];

const TEMPLATES: &[(&str, &[TemplateFile])] =
    &[("python_minimal", PYTHON_MINIMAL), ("node_minimal", NODE_MINIMAL), ("empty", EMPTY)];

/// The template names, for error messages and the UI.
pub fn names() -> String {
    TEMPLATES.iter().map(|(name, _)| format!("template:{name}")).collect::<Vec<_>>().join(", ")
}

/// The files of `source` (`template:<name>`), or `UnknownSource`.
pub(crate) fn files(source: &str) -> Result<&'static [TemplateFile], DriverError> {
    source
        .strip_prefix("template:")
        .and_then(|name| TEMPLATES.iter().find(|(n, _)| *n == name))
        .map(|(_, files)| *files)
        .ok_or_else(|| DriverError::UnknownSource(source.to_owned(), names()))
}

/// Seeds a fresh volume (the Kubernetes Studio Pod's `nexus seed-volume`
/// init container): writes `source` into `dir` unless `dir` already holds
/// anything besides `lost+found`, so a volume is seeded once and its
/// owner's work is never overwritten. True when it wrote.
pub fn seed(source: &str, dir: &Path) -> Result<bool, DriverError> {
    let files = files(source)?;
    for entry in std::fs::read_dir(dir)? {
        if entry?.file_name() != "lost+found" {
            return Ok(false);
        }
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(true)
}

/// Writes the template `source` into the existing empty directory `dir`.
pub(crate) fn write(source: &str, dir: &Path) -> Result<(), DriverError> {
    for (name, text) in files(source)? {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}
