//! A minimal async TCLIService client built on the upstream [`Link`]: typed
//! calls with the generated structs. Used by tests and tools that talk to a
//! broker or a HiveServer2 directly.

use std::sync::Arc;

use bytes::Bytes;
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TFieldIdentifier, TInputProtocol,
    TMessageIdentifier, TMessageType, TOutputProtocol, TSerializable, TStructIdentifier, TType,
};

use crate::config::{Transport, UpstreamConfig, UpstreamSasl};
use crate::error::UpstreamError;
use crate::identity::Credential;
use crate::secret::Secret;
use crate::tcli::gen::*;
use crate::upstream::{HttpPool, Link, Target};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] UpstreamError),
    #[error("thrift: {0}")]
    Thrift(#[from] thrift::Error),
    #[error("server exception: {0}")]
    Application(String),
    /// The connection cannot be set up as described (a TLS CA file).
    #[error("{0}")]
    Setup(String),
    /// An error TStatus: code, message and SQLSTATE.
    #[error("{0:?}: {1}")]
    Status(TStatusCode, String, Option<String>),
}

pub struct Hs2Client {
    link: Link,
    seqid: i32,
    /// NOSASL carries the identity in OpenSession, as Hive JDBC does for auth=noSasl.
    nosasl_identity: Option<(String, String)>,
}

impl Hs2Client {
    /// Connects as `user`/`password` to the server described by `cfg`.
    pub async fn connect(
        cfg: &UpstreamConfig,
        user: &str,
        password: &str,
    ) -> Result<Hs2Client, ClientError> {
        let tls = cfg
            .client_tls("target")
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Self::connect_with_tls(cfg, tls, user, password).await
    }

    /// As [`connect`](Self::connect), with `tls` built by the caller from
    /// `cfg.client_tls` (`None`: plaintext): connections given the same one
    /// resume its TLS sessions, as the broker's own upstream connections do.
    pub async fn connect_with_tls(
        cfg: &UpstreamConfig,
        tls: Option<crate::tls::client::ClientTls>,
        user: &str,
        password: &str,
    ) -> Result<Hs2Client, ClientError> {
        let target = Arc::new(Target::from_config(cfg, 1 << 30, None, tls));
        let cred = Credential {
            user: user.to_string(),
            password: Secret::new(password),
            kerberos: None,
        };
        let local = std::net::IpAddr::from([127, 0, 0, 1]);
        let pool = HttpPool::new(cfg.connect_timeout, target.tls.as_ref());
        let link = Link::open(&target, &cred, &pool, local).await?;
        let nosasl = cfg.transport == Transport::Binary && cfg.sasl == UpstreamSasl::Nosasl;
        Ok(Hs2Client {
            link,
            seqid: 0,
            nosasl_identity: nosasl.then(|| (user.to_string(), password.to_string())),
        })
    }

    /// Sends raw bytes and returns the raw reply.
    pub async fn call_raw(&mut self, msg: Bytes) -> Result<Bytes, ClientError> {
        Ok(self.link.call(msg).await?)
    }

    pub async fn call<Req: TSerializable, Resp: TSerializable>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.seqid += 1;
        let mut buf: Vec<u8> = Vec::new();
        {
            let mut p = TBinaryOutputProtocol::new(&mut buf, true);
            p.write_message_begin(&TMessageIdentifier::new(
                method,
                TMessageType::Call,
                self.seqid,
            ))?;
            p.write_struct_begin(&TStructIdentifier::new("args"))?;
            p.write_field_begin(&TFieldIdentifier::new("req", TType::Struct, 1))?;
            req.write_to_out_protocol(&mut p)?;
            p.write_field_end()?;
            p.write_field_stop()?;
            p.write_struct_end()?;
            p.write_message_end()?;
        }
        let reply = self.link.call(Bytes::from(buf)).await?;
        let mut p = TBinaryInputProtocol::new(&reply[..], true);
        let id = p.read_message_begin()?;
        if id.message_type == TMessageType::Exception {
            let e = thrift::Error::read_application_error_from_in_protocol(&mut p)?;
            return Err(ClientError::Application(e.message));
        }
        p.read_struct_begin()?;
        loop {
            let f = p.read_field_begin()?;
            if f.field_type == TType::Stop {
                return Err(ClientError::Application(format!(
                    "{method} reply has no result"
                )));
            }
            if f.id == Some(0) {
                return Ok(Resp::read_from_in_protocol(&mut p)?);
            }
            p.skip(f.field_type)?;
        }
    }

    pub async fn open_session(&mut self) -> Result<TSessionHandle, ClientError> {
        self.open_session_with(&[]).await
    }

    /// Opens a session with these OpenSession configuration entries.
    pub async fn open_session_with(
        &mut self,
        conf: &[(&str, &str)],
    ) -> Result<TSessionHandle, ClientError> {
        let configuration = (!conf.is_empty()).then(|| {
            conf.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        let req = TOpenSessionReq {
            client_protocol: TProtocolVersion::HIVE_CLI_SERVICE_PROTOCOL_V10,
            username: self.nosasl_identity.as_ref().map(|(u, _)| u.clone()),
            password: self.nosasl_identity.as_ref().map(|(_, p)| p.clone()),
            configuration,
        };
        let resp: TOpenSessionResp = self.call("OpenSession", &req).await?;
        check(&resp.status)?;
        resp.session_handle
            .ok_or_else(|| ClientError::Application("OpenSession returned no handle".into()))
    }

    /// Runs a statement synchronously and returns its operation handle.
    pub async fn execute(
        &mut self,
        session: &TSessionHandle,
        sql: &str,
    ) -> Result<TOperationHandle, ClientError> {
        let req = TExecuteStatementReq {
            session_handle: session.clone(),
            statement: sql.to_string(),
            conf_overlay: None,
            run_async: Some(false),
            query_timeout: None,
        };
        let resp: TExecuteStatementResp = self.call("ExecuteStatement", &req).await?;
        check(&resp.status)?;
        resp.operation_handle
            .ok_or_else(|| ClientError::Application("ExecuteStatement returned no handle".into()))
    }

    pub async fn fetch(
        &mut self,
        op: &TOperationHandle,
        max_rows: i64,
    ) -> Result<TFetchResultsResp, ClientError> {
        let req = TFetchResultsReq {
            operation_handle: op.clone(),
            orientation: TFetchOrientation::FETCH_NEXT,
            max_rows,
            fetch_type: Some(0),
        };
        let resp: TFetchResultsResp = self.call("FetchResults", &req).await?;
        check(&resp.status)?;
        Ok(resp)
    }

    pub async fn close_operation(&mut self, op: TOperationHandle) -> Result<(), ClientError> {
        let resp: TCloseOperationResp = self
            .call(
                "CloseOperation",
                &TCloseOperationReq {
                    operation_handle: op,
                },
            )
            .await?;
        check(&resp.status)
    }

    /// One small round trip: GetInfo(server name).
    pub async fn get_info(&mut self, session: &TSessionHandle) -> Result<(), ClientError> {
        let resp: TGetInfoResp = self
            .call(
                "GetInfo",
                &TGetInfoReq {
                    session_handle: session.clone(),
                    info_type: TGetInfoType::CLI_SERVER_NAME,
                },
            )
            .await?;
        check(&resp.status)
    }

    /// GetTables for every table, returning the operation.
    pub async fn get_tables(
        &mut self,
        session: &TSessionHandle,
    ) -> Result<TOperationHandle, ClientError> {
        let req = TGetTablesReq::new(
            session.clone(),
            None,
            Some("%".to_string()),
            Some("%".to_string()),
            None,
        );
        let resp: TGetTablesResp = self.call("GetTables", &req).await?;
        check(&resp.status)?;
        resp.operation_handle
            .ok_or_else(|| ClientError::Application("GetTables returned no handle".into()))
    }

    /// GetColumns for every column, returning the operation.
    pub async fn get_columns(
        &mut self,
        session: &TSessionHandle,
    ) -> Result<TOperationHandle, ClientError> {
        let req = TGetColumnsReq::new(
            session.clone(),
            None,
            Some("%".to_string()),
            Some("%".to_string()),
            Some("%".to_string()),
        );
        let resp: TGetColumnsResp = self.call("GetColumns", &req).await?;
        check(&resp.status)?;
        resp.operation_handle
            .ok_or_else(|| ClientError::Application("GetColumns returned no handle".into()))
    }

    pub async fn close_session(&mut self, session: TSessionHandle) -> Result<(), ClientError> {
        let resp: TCloseSessionResp = self
            .call(
                "CloseSession",
                &TCloseSessionReq {
                    session_handle: session,
                },
            )
            .await?;
        check(&resp.status)
    }
}

/// Turns an error TStatus into an error.
pub fn check(status: &TStatus) -> Result<(), ClientError> {
    match status.status_code {
        TStatusCode::SUCCESS_STATUS
        | TStatusCode::SUCCESS_WITH_INFO_STATUS
        | TStatusCode::STILL_EXECUTING_STATUS => Ok(()),
        code => Err(ClientError::Status(
            code,
            status.error_message.clone().unwrap_or_default(),
            status.sql_state.clone(),
        )),
    }
}
