//! Certificates and keys for a throw-away control plane: one CA, the API server's serving
//! certificate, client certificates for each component, and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything the control plane needs to authenticate its parts to each other.
pub struct Pki {
    pub ca: CertAndKey,
    pub serving: CertAndKey,
    pub admin: CertAndKey,
    pub controller_manager: CertAndKey,
    pub scheduler: CertAndKey,
    pub kwok: CertAndKey,
    /// Private key that signs service-account tokens (PKCS#8 PEM).
    pub service_account_key_pem: String,
    /// Its public key (SubjectPublicKeyInfo PEM), which verifies them.
    pub service_account_pub_pem: String,
}

impl Pki {
    /// Generates a fresh PKI. The serving certificate is valid for 127.0.0.1, localhost and the
    /// in-cluster names of the `kubernetes` Service.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "llama-operator-test-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = CertAndKey {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        };
        let issuer = Issuer::new(ca_params, ca_key);

        let serving = leaf(
            &issuer,
            "kube-apiserver",
            None,
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = |cn: &str, org: Option<&str>| {
            leaf(
                &issuer,
                cn,
                org,
                &[],
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            )
        };
        let sa_key = KeyPair::generate()?;
        Ok(Self {
            admin: client("llama-operator-test-admin", Some("system:masters"))?,
            controller_manager: client("system:kube-controller-manager", None)?,
            scheduler: client("system:kube-scheduler", None)?,
            kwok: client("kwok", Some("system:masters"))?,
            serving,
            ca,
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_pub_pem: sa_key.public_key_pem(),
        })
    }

    /// Writes the files the API server and controller-manager read.
    pub fn write_server_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), &self.ca.cert_pem)?;
        std::fs::write(dir.join("ca.key"), &self.ca.key_pem)?;
        std::fs::write(dir.join("apiserver.crt"), &self.serving.cert_pem)?;
        std::fs::write(dir.join("apiserver.key"), &self.serving.key_pem)?;
        std::fs::write(dir.join("sa.key"), &self.service_account_key_pem)?;
        std::fs::write(dir.join("sa.pub"), &self.service_account_pub_pem)?;
        Ok(())
    }
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    dns_names: &[&str],
    ips: &[IpAddr],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertAndKey, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
