//! A panel's Studio files over HTTP, owner only:
//!
//! | route | does |
//! |---|---|
//! | `GET /api/panels/{id}/files` | lists every entry ([`FileList`]) |
//! | `PUT /api/panels/{id}/files` | replaces the tree with a tar.gz or zip body |
//! | `GET /api/panels/{id}/files/{path}` | the file's bytes |
//! | `PUT /api/panels/{id}/files/{path}` | saves the body as the file (201 new, 200 replaced) |
//! | `DELETE /api/panels/{id}/files/{path}` | deletes a file, symlink or directory |
//!
//! The owner check comes first, then the path check ([`FilePath`]), then
//! the body is read up to the driver's limit: nothing is touched for
//! another user's panel or a bad path. A file is served as opaque bytes
//! (`application/octet-stream`, `nosniff`, a sandboxing CSP), never as a
//! page of this origin: a panel's files are its author's, and its author
//! may be an attacker.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::SemaphorePermit;
use utoipa::ToSchema;

use super::api::{own_panel, PmApi};
use super::driver::DriverError;
use super::metrics::FileChange;
use super::volume_files::{FileEntry, FileError, FileKind, FileList, FilePath, VolumeLimits};
use super::PanelManagerError;
use crate::platform::http::{read_body, BodyError};
use crate::platform::{ApiError, Caller, ErrorBody};

/// Bytes of request bodies the files API holds in memory at once, all
/// panels together; past it a save or upload is 503 `busy`, so many large
/// uploads at once cannot exhaust the node's memory.
pub const MAX_BUFFERED: usize = 256 << 20;

/// What `PUT /api/panels/{id}/files/{path}` saved.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Saved {
    /// The file's path.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

impl From<FileError> for ApiError {
    fn from(error: FileError) -> Self {
        let message = error.to_string();
        match error {
            FileError::BadPath { .. } | FileError::BadArchive(_) => ApiError::BadRequest(message),
            FileError::NotFound(_) => ApiError::NotFound("file"),
            FileError::WrongKind { .. } | FileError::Busy => ApiError::Conflict(message),
            FileError::FileTooLarge { .. } => ApiError::TooLarge(message),
            FileError::Quota { .. } => ApiError::OverQuota(message),
        }
    }
}

fn api_error(error: DriverError) -> ApiError {
    match error {
        DriverError::File(error) => error.into(),
        e @ (DriverError::UnknownSource(..) | DriverError::InvalidId { .. }) => ApiError::BadRequest(e.to_string()),
        e @ DriverError::NoFileAccess(_) => ApiError::Conflict(e.to_string()),
        e => PanelManagerError::from(e).into(),
    }
}

/// Counts a change by how it ended.
fn counted<T>(api: &PmApi, op: FileChange, result: Result<T, ApiError>) -> Result<T, ApiError> {
    let label = match &result {
        Ok(_) => "ok",
        Err(ApiError::Internal(_) | ApiError::Unavailable(_)) => "failed",
        Err(_) => "refused",
    };
    api.handle.metrics.file_changed(op, label);
    if label != "ok" {
        tracing::info!(op = op.label(), result = label, "nexus_panel_file_changes_total");
    }
    result
}

/// The body, up to `limit` bytes, read once room for that many is taken
/// from the node's budget; the room is given back when the permit drops.
async fn body<'a>(
    api: &'a PmApi,
    req: &HttpRequest,
    payload: web::Payload,
    limit: u64,
) -> Result<(web::Bytes, SemaphorePermit<'a>), ApiError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(MAX_BUFFERED);
    let room = u32::try_from(limit).unwrap_or(u32::MAX);
    let permit = api.file_bodies.try_acquire_many(room).map_err(|_| {
        tracing::warn!(limit, "nexus_panel_file_changes_total: bodies over the node's budget, refused");
        ApiError::Busy { retry_after: 1 }
    })?;
    let bytes = read_body(req, payload, limit).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => ApiError::BodyTooLarge { limit },
        BodyError::Unreadable(why) => ApiError::BadRequest(format!("unreadable body: {why}")),
    })?;
    Ok((bytes, permit))
}

/// Every entry of the panel's files.
#[utoipa::path(get, path = "/api/panels/{id}/files", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = FileList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_files(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let list = api.handle.driver.list_files(&panel.id, &panel.source).await.map_err(api_error)?;
    Ok(HttpResponse::Ok().json(list))
}

/// Replaces the panel's files with the tree in a tar.gz or zip body.
#[utoipa::path(put, path = "/api/panels/{id}/files", security(("bearer" = [])), params(("id" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/gzip", description = "a tar.gz or zip archive"),
    responses((status = 200, body = FileList), (status = 400, description = "not an archive, or an entry refused", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, description = "not the owner, or quota_exceeded", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn upload(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let replaced = async {
        let (archive, _room) = body(&api, &req, payload, api.handle.driver.file_limits().max_bytes).await?;
        api.handle.driver.replace_files(&panel.id, &panel.source, archive).await.map_err(api_error)
    };
    let list = counted(&api, FileChange::Upload, replaced.await)?;
    tracing::info!(panel = %panel.id, entries = list.entries.len(), bytes = list.bytes, "panel files uploaded");
    Ok(HttpResponse::Ok().json(list))
}

fn file_path(req: &HttpRequest) -> Result<FilePath, ApiError> {
    Ok(FilePath::parse(&unquote(req.match_info().query("path")))?)
}

/// The router decodes a path's percent escapes except `%25`, `%2F` and
/// `%2B` (`%`, `/`, `+`), so that an escaped `/` is not a separator to it;
/// to the files API it is a `/` like any other, checked as a path.
fn unquote(matched: &str) -> String {
    let mut text = String::with_capacity(matched.len());
    let mut rest = matched;
    while let Some(at) = rest.find('%') {
        text.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).unwrap_or("");
        let decoded = match escape.to_ascii_uppercase().as_str() {
            "%25" => Some('%'),
            "%2F" => Some('/'),
            "%2B" => Some('+'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                text.push(c);
                rest = &rest[at + 3..];
            }
            None => {
                text.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    text.push_str(rest);
    text
}

/// One file's bytes.
#[utoipa::path(get, path = "/api/panels/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path), ("path" = String, Path, description = "a relative path; `/` separates directories")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "a directory, symlink or special file", body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn read_file(caller: Caller, api: web::Data<PmApi>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, req.match_info().query("id")).await?;
    let path = file_path(&req)?;
    let bytes = api.handle.driver.read_file(&panel.id, &panel.source, path).await.map_err(api_error)?;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(bytes))
}

/// Saves the body as one file, making missing directories.
#[utoipa::path(put, path = "/api/panels/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path), ("path" = String, Path, description = "a relative path; `/` separates directories")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Saved), (status = 200, body = Saved), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "not the owner, or quota_exceeded", body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "a directory or symlink is there, or another change is in progress", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn write_file(
    caller: Caller,
    api: web::Data<PmApi>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, req.match_info().query("id")).await?;
    let saved = async {
        let path = file_path(&req)?;
        let (bytes, _room) = body(&api, &req, payload, api.handle.driver.file_limits().max_file_bytes).await?;
        let size = bytes.len() as u64;
        let created =
            api.handle.driver.write_file(&panel.id, &panel.source, path.clone(), bytes).await.map_err(api_error)?;
        Ok((Saved { path: path.to_string(), size }, created))
    };
    let (saved, created) = counted(&api, FileChange::Write, saved.await)?;
    let mut response = if created { HttpResponse::Created() } else { HttpResponse::Ok() };
    Ok(response.json(saved))
}

/// Deletes a file, symlink or directory (with everything in it).
#[utoipa::path(delete, path = "/api/panels/{id}/files/{path}", security(("bearer" = [])),
    params(("id" = String, Path), ("path" = String, Path, description = "a relative path; `/` separates directories")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_file(caller: Caller, api: web::Data<PmApi>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, req.match_info().query("id")).await?;
    let deleted = async {
        let path = file_path(&req)?;
        api.handle.driver.delete_file(&panel.id, &panel.source, path).await.map_err(api_error)
    };
    counted(&api, FileChange::Delete, deleted.await)?;
    Ok(HttpResponse::NoContent().finish())
}

/// The OpenAPI description of these routes, to merge into the node's.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_files, upload, read_file, write_file, delete_file),
    components(schemas(FileList, FileEntry, FileKind, VolumeLimits, Saved))
)]
pub struct FilesApiDoc;

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/panels/{id}/files", web::get().to(list_files))
        .route("/api/panels/{id}/files", web::put().to(upload))
        .route("/api/panels/{id}/files/{path:.+}", web::get().to(read_file))
        .route("/api/panels/{id}/files/{path:.+}", web::put().to(write_file))
        .route("/api/panels/{id}/files/{path:.+}", web::delete().to(delete_file));
}

#[cfg(test)]
mod tests {
    use super::unquote;

    #[test]
    fn the_escapes_the_router_keeps_are_decoded_once() {
        assert_eq!(unquote("%2Fetc%2fpasswd"), "/etc/passwd");
        assert_eq!(unquote("100%25.txt"), "100%.txt");
        assert_eq!(unquote("a%252Fb"), "a%2Fb", "decoded once, not twice");
        assert_eq!(unquote("c%2B%2B.md"), "c++.md");
        assert_eq!(unquote("50%"), "50%");
        assert_eq!(unquote("%zz%2"), "%zz%2");
    }
}
