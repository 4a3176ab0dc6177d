//! TLS and signing material made with the `openssl` command-line tool.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;

/// A self-signed CA and a server certificate for 127.0.0.1 / localhost.
pub struct Tls {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run openssl: {e}"),
    }
}

impl Tls {
    /// Creates the CA and server certificate in `dir`; `name` makes file names unique.
    pub fn create(dir: &Path, name: &str) -> Tls {
        let f = |s: &str| format!("{name}-{s}");
        let ext = dir.join(f("ext.cnf"));
        std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
            .expect("write ext");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a: Vec<&str> = vec!["req", "-x509"];
        a.extend(ec);
        let (cak, cac) = (f("ca.key"), f("ca.crt"));
        a.extend([
            "-keyout",
            &cak,
            "-out",
            &cac,
            "-days",
            "2",
            "-subj",
            "/CN=testenv CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &a);
        let (sk, csr, sc) = (f("server.key"), f("server.csr"), f("server.crt"));
        let mut a: Vec<&str> = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &sk, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
        openssl(dir, &a);
        let extp = ext.display().to_string();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &cac,
                "-CAkey",
                &cak,
                "-CAcreateserial",
                "-out",
                &sc,
                "-days",
                "2",
                "-extfile",
                &extp,
            ],
        );
        Tls {
            ca_cert: dir.join(cac),
            server_cert: dir.join(sc),
            server_key: dir.join(sk),
        }
    }
}

/// An RSA key and self-signed certificate for signing registry tokens.
pub struct TokenSigner {
    pub cert: PathBuf,
    pub key_pem: Vec<u8>,
    /// Base64 (standard) DER of the certificate, for the JWT `x5c` header.
    pub cert_der_b64: String,
}

impl TokenSigner {
    pub fn create(dir: &Path) -> TokenSigner {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-days",
                "2",
                "-subj",
                "/CN=testenv token signer",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "token.crt",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        );
        let der = std::fs::read(dir.join("token.der")).expect("read der");
        TokenSigner {
            cert: dir.join("token.crt"),
            key_pem: std::fs::read(dir.join("token.key")).expect("read key"),
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(der),
        }
    }
}
