//! Connections to nodes: one multiplexed `redis` connection per address, every
//! command bounded by a timeout so that a silent (e.g. SIGSTOPped) node costs
//! the caller at most that long, never a hang.
//!
//! Not responsible for deciding what to send; callers build the commands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, IntoConnectionInfo};

use super::config::Auth;

use crate::{Error, Result};

/// A cache of connections, keyed by node address.
#[derive(Debug)]
pub struct Conns {
    timeout: Duration,
    auth: Option<Auth>,
    map: HashMap<SocketAddr, MultiplexedConnection>,
}

/// How a command is named in errors: its first words, never its keys.
fn describe(cmd: &Cmd) -> String {
    let mut words = Vec::new();
    for arg in cmd.args_iter().take(2) {
        if let redis::Arg::Simple(bytes) = arg {
            words.push(String::from_utf8_lossy(bytes).to_ascii_uppercase());
        }
    }
    words.join(" ")
}

impl Conns {
    /// Connections whose connect and commands time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self::with_auth(timeout, None)
    }

    /// Connections that authenticate with `auth` (`AUTH [user] password` on
    /// connect).
    pub fn with_auth(timeout: Duration, auth: Option<Auth>) -> Self {
        Self {
            timeout,
            auth,
            map: HashMap::new(),
        }
    }

    /// The default timeout of this cache.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn connection(&mut self, addr: SocketAddr) -> Result<MultiplexedConnection> {
        if let Some(c) = self.map.get(&addr) {
            return Ok(c.clone());
        }
        let mut info = format!("redis://{addr}/")
            .into_connection_info()
            .map_err(|source| Error::Connect { addr, source })?;
        if let Some(auth) = &self.auth {
            let mut redis = info.redis_settings().clone().set_password(&auth.password);
            if let Some(user) = &auth.username {
                redis = redis.set_username(user);
            }
            info = info.set_redis_settings(redis);
        }
        let client = redis::Client::open(info).map_err(|source| Error::Connect { addr, source })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let conn = tokio::time::timeout(
            self.timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| Error::Timeout {
            addr,
            command: "connect".into(),
            timeout: self.timeout,
        })?
        .map_err(|source| Error::Connect { addr, source })?;
        self.map.insert(addr, conn.clone());
        Ok(conn)
    }

    /// Runs `cmd` on `addr` under the default timeout.
    pub async fn query<T: FromRedisValue>(&mut self, addr: SocketAddr, cmd: &Cmd) -> Result<T> {
        let timeout = self.timeout;
        self.query_within(addr, cmd, timeout).await
    }

    /// Runs `cmd` on `addr` under `timeout` (e.g. a long `MIGRATE`).
    pub async fn query_within<T: FromRedisValue>(
        &mut self,
        addr: SocketAddr,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T> {
        let mut conn = self.connection(addr).await?;
        match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
            Err(_) => {
                self.map.remove(&addr);
                Err(Error::Timeout {
                    addr,
                    command: describe(cmd),
                    timeout,
                })
            }
            Ok(Err(source)) => {
                if source.is_io_error() || source.is_connection_dropped() || source.is_unrecoverable_error() {
                    self.map.remove(&addr);
                }
                Err(Error::Command {
                    addr,
                    command: describe(cmd),
                    source,
                })
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Sends `cmds` to `addr` as one pipeline and returns each command's own
    /// outcome; only a transport failure or timeout fails the whole call.
    pub async fn pipeline(
        &mut self,
        addr: SocketAddr,
        cmds: &[Cmd],
    ) -> Result<Vec<Result<redis::Value, redis::RedisError>>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        let command = cmds.first().map(describe).unwrap_or_default();
        let mut conn = self.connection(addr).await?;
        let timeout = self.timeout;
        match tokio::time::timeout(
            timeout,
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
        )
        .await
        {
            Err(_) => {
                self.map.remove(&addr);
                Err(Error::Timeout {
                    addr,
                    command,
                    timeout,
                })
            }
            Ok(Err(source)) => {
                self.map.remove(&addr);
                Err(Error::Command {
                    addr,
                    command,
                    source,
                })
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// A cache holding only the connection to `addr` from this one, if any:
    /// lets concurrent tasks each own a cache and hand it back with [`Conns::adopt`].
    pub fn split_for(&self, addr: SocketAddr) -> Conns {
        let mut map = HashMap::new();
        if let Some(c) = self.map.get(&addr) {
            map.insert(addr, c.clone());
        }
        Conns {
            timeout: self.timeout,
            auth: self.auth.clone(),
            map,
        }
    }

    /// Takes over the connections of `other` (made by [`Conns::split_for`]).
    pub fn adopt(&mut self, addr: SocketAddr, other: Conns) {
        match other.map.get(&addr) {
            Some(c) => {
                self.map.insert(addr, c.clone());
            }
            None => {
                self.map.remove(&addr);
            }
        }
    }

    /// Forgets the connection to `addr` (after the node was destroyed).
    pub fn drop_connection(&mut self, addr: SocketAddr) {
        self.map.remove(&addr);
    }
}
