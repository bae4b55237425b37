//! The crate's only `unsafe` code: MIT's `gss_acquire_cred_from`, which
//! `libgssapi` does not wrap. It takes a credential store (a keytab, a client
//! keytab and a ccache), so each principal gets its own cache and its tickets
//! are fetched from its keytab, without touching the process environment.
//! Everything here is one call plus the name import and cleanup around it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::raw::c_void;
use std::ptr;

use libgssapi::credential::Cred;
use libgssapi_sys::{
    gss_OID_desc, gss_acquire_cred_from, gss_buffer_desc, gss_cred_id_t, gss_display_status,
    gss_import_name, gss_key_value_element_desc, gss_key_value_set_desc, gss_name_t,
    gss_release_buffer, gss_release_name, OM_uint32, GSS_C_ACCEPT, GSS_C_INITIATE,
};

/// 1.2.840.113554.1.2.2.1, GSS_KRB5_NT_PRINCIPAL_NAME (RFC 1964).
const KRB5_NT_PRINCIPAL: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01";
const GSS_S_COMPLETE: OM_uint32 = 0;
const GSS_C_GSS_CODE: i32 = 1;
const GSS_C_MECH_CODE: i32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Initiate,
    Accept,
}

/// A GSS name imported from a principal string, released on drop.
struct ImportedName(gss_name_t);

impl ImportedName {
    fn new(principal: &str) -> Result<ImportedName, String> {
        let mut oid = gss_OID_desc {
            length: KRB5_NT_PRINCIPAL.len() as OM_uint32,
            elements: KRB5_NT_PRINCIPAL.as_ptr() as *mut c_void,
        };
        let mut buf = gss_buffer_desc {
            length: principal.len(),
            value: principal.as_ptr() as *mut c_void,
        };
        let mut minor: OM_uint32 = 0;
        let mut name: gss_name_t = ptr::null_mut();
        // SAFETY: buf and oid point at live memory for the call; gss copies them.
        let major = unsafe { gss_import_name(&mut minor, &mut buf, &mut oid, &mut name) };
        if major != GSS_S_COMPLETE {
            return Err(format!(
                "'{principal}' is not a Kerberos principal name: {}",
                status_text(major, minor)
            ));
        }
        Ok(ImportedName(name))
    }
}

impl Drop for ImportedName {
    fn drop(&mut self) {
        let mut minor: OM_uint32 = 0;
        // SAFETY: the name came from gss_import_name and is released once.
        unsafe { gss_release_name(&mut minor, &mut self.0) };
    }
}

/// Acquires credentials from an MIT credential store. `principal = None`
/// accepts for any key in the keytab (acceptors only).
pub fn acquire_from(
    principal: Option<&str>,
    usage: Usage,
    store: &[(&str, &str)],
) -> Result<Cred, String> {
    let name = principal.map(ImportedName::new).transpose()?;
    let owned: Vec<(CString, CString)> = store
        .iter()
        .map(|(k, v)| {
            Ok((
                CString::new(*k).map_err(|_| "NUL in a credential store key")?,
                CString::new(*v).map_err(|_| format!("NUL in credential store value for {k}"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let mut elements: Vec<gss_key_value_element_desc> = owned
        .iter()
        .map(|(k, v)| gss_key_value_element_desc {
            key: k.as_ptr(),
            value: v.as_ptr(),
        })
        .collect();
    let set = gss_key_value_set_desc {
        count: elements.len() as OM_uint32,
        elements: elements.as_mut_ptr(),
    };
    let usage = match usage {
        Usage::Initiate => GSS_C_INITIATE,
        Usage::Accept => GSS_C_ACCEPT,
    } as libgssapi_sys::gss_cred_usage_t;
    let mut minor: OM_uint32 = 0;
    let mut cred: gss_cred_id_t = ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call (`owned`,
    // `elements`, `name` outlive it); out-params are ours to fill. A null
    // mechanism set asks for every mechanism (krb5 and SPNEGO).
    let major = unsafe {
        gss_acquire_cred_from(
            &mut minor,
            name.as_ref().map_or(ptr::null_mut(), |n| n.0),
            0,
            ptr::null_mut(),
            usage,
            &set,
            &mut cred,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    if major != GSS_S_COMPLETE {
        return Err(status_text(major, minor));
    }
    // SAFETY: a fresh credential we own alone; Cred releases it on drop.
    Ok(unsafe { Cred::from_c(cred) })
}

/// The GSS major and mechanism (minor) messages, e.g. "No credentials were
/// supplied ...: Keytab FILE:/x is nonexistent or empty".
fn status_text(major: OM_uint32, minor: OM_uint32) -> String {
    let mut parts = Vec::new();
    for (code, kind) in [(major, GSS_C_GSS_CODE), (minor, GSS_C_MECH_CODE)] {
        if code == 0 {
            continue;
        }
        let mut ctx: OM_uint32 = 0;
        loop {
            let mut min: OM_uint32 = 0;
            let mut buf = gss_buffer_desc {
                length: 0,
                value: ptr::null_mut(),
            };
            // SAFETY: buf is an out-param released below; a null mech means
            // the default (krb5) for minor codes.
            let m = unsafe {
                gss_display_status(&mut min, code, kind, ptr::null_mut(), &mut ctx, &mut buf)
            };
            if m != GSS_S_COMPLETE {
                break;
            }
            if !buf.value.is_null() {
                // SAFETY: gss returned `length` readable bytes at `value`.
                let s = unsafe { std::slice::from_raw_parts(buf.value as *const u8, buf.length) };
                parts.push(String::from_utf8_lossy(s).into_owned());
                // SAFETY: releases the buffer gss allocated above.
                unsafe { gss_release_buffer(&mut min, &mut buf) };
            }
            if ctx == 0 {
                break;
            }
        }
    }
    if parts.is_empty() {
        format!("GSS error {major:#x}/{minor}")
    } else {
        parts.join(": ")
    }
}
