#!/usr/bin/env bash
# Make an SROS2-layout keystore for a secured TimeBill system with openssl alone (no
# `ros2 security`): an identity CA and a permissions CA, one enclave per node, a governance
# that admits only authenticated participants and encrypts discovery, liveliness and data.
#
#   tools/make_keystore.sh KEYSTORE [ENCLAVE ...]
#
# ENCLAVE: an enclave path (/timebill/timebill_server) or a bare node name (timebill_server,
# read as /timebill/<name>). Default: every TimeBill node, generators _0.._3, and the clients
# `timebill bringup` and the tests use. Run again to add enclaves: the CAs are kept.
# Layout (as `ros2 security create_keystore/create_enclave` writes it):
#   KEYSTORE/public/{identity_ca,permissions_ca}.cert.pem
#   KEYSTORE/private/{identity_ca,permissions_ca}.key.pem
#   KEYSTORE/enclaves/governance.{xml,p7s}
#   KEYSTORE/enclaves/<enclave>/{cert,key,identity_ca.cert,permissions_ca.cert}.pem
#   KEYSTORE/enclaves/<enclave>/{governance.p7s,permissions.xml,permissions.p7s}
# Environment: DOMAIN_MIN/DOMAIN_MAX (0..232) bound the domains, DAYS the validity (3650).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ))
fi
KS=$1
shift
ENCLAVES=("$@")
if [[ ${#ENCLAVES[@]} -eq 0 ]]; then
  ENCLAVES=(timebill_predictor timebill_server timebill_lifecycle_manager timebill_generator
    timebill_generator_0 timebill_generator_1 timebill_generator_2 timebill_generator_3
    timebill_bringup timebill_client)
fi
DOMAIN_MIN=${DOMAIN_MIN:-0}
DOMAIN_MAX=${DOMAIN_MAX:-232}
DAYS=${DAYS:-3650}
SCHEMA=http://www.omg.org/spec/DDS-SECURITY/20170901

mkdir -p "$KS/public" "$KS/private" "$KS/enclaves"
chmod 700 "$KS/private"

ca() {  # ca NAME SUBJECT: a self-signed EC P-256 CA, kept if it exists
  local name=$1 subject=$2
  [[ -f $KS/public/$name.cert.pem ]] && return
  openssl ecparam -name prime256v1 -genkey -noout -out "$KS/private/$name.key.pem"
  openssl req -x509 -new -sha256 -key "$KS/private/$name.key.pem" -days "$DAYS" \
    -subj "$subject" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,digitalSignature,keyCertSign,cRLSign -out "$KS/public/$name.cert.pem"
}
ca identity_ca '/CN=timebill_identity_ca'
ca permissions_ca '/CN=timebill_permissions_ca'

sign() {  # sign IN OUT: S/MIME (text, detached) signed by the permissions CA, as SROS2 does
  openssl smime -sign -text -in "$1" -out "$2" \
    -signer "$KS/public/permissions_ca.cert.pem" -inkey "$KS/private/permissions_ca.key.pem"
}

domains="<domains><id_range><min>$DOMAIN_MIN</min><max>$DOMAIN_MAX</max></id_range></domains>"
GOV=$KS/enclaves/governance.xml
cat >"$GOV" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xsi:noNamespaceSchemaLocation="$SCHEMA/omg_shared_ca_governance.xsd">
  <domain_access_rules>
    <domain_rule>
      $domains
      <allow_unauthenticated_participants>false</allow_unauthenticated_participants>
      <enable_join_access_control>true</enable_join_access_control>
      <discovery_protection_kind>ENCRYPT</discovery_protection_kind>
      <liveliness_protection_kind>ENCRYPT</liveliness_protection_kind>
      <rtps_protection_kind>ENCRYPT</rtps_protection_kind>
      <topic_access_rules>
        <topic_rule>
          <topic_expression>*</topic_expression>
          <enable_discovery_protection>true</enable_discovery_protection>
          <enable_liveliness_protection>true</enable_liveliness_protection>
          <enable_read_access_control>true</enable_read_access_control>
          <enable_write_access_control>true</enable_write_access_control>
          <metadata_protection_kind>ENCRYPT</metadata_protection_kind>
          <data_protection_kind>ENCRYPT</data_protection_kind>
        </topic_rule>
      </topic_access_rules>
    </domain_rule>
  </domain_access_rules>
</dds>
EOF
sign "$GOV" "$KS/enclaves/governance.p7s"

not_before=$(date -u +%Y-%m-%dT%H:%M:%S)
not_after=$(date -u -d "+$DAYS days" +%Y-%m-%dT%H:%M:%S)
for enclave in "${ENCLAVES[@]}"; do
  [[ $enclave == /* ]] || enclave=/timebill/$enclave
  dir=$KS/enclaves${enclave}
  mkdir -p "$dir"
  if [[ ! -f $dir/cert.pem ]]; then  # the enclave's identity: CN=<enclave path>
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/key.pem"
    openssl req -new -sha256 -key "$dir/key.pem" -subj "/CN=${enclave//\//\\/}" -out "$dir/req.pem"
    openssl x509 -req -sha256 -in "$dir/req.pem" -days "$DAYS" \
      -CA "$KS/public/identity_ca.cert.pem" -CAkey "$KS/private/identity_ca.key.pem" \
      -CAcreateserial -out "$dir/cert.pem" 2>/dev/null
    rm -f "$dir/req.pem"
  fi
  cp "$KS/public/identity_ca.cert.pem" "$KS/public/permissions_ca.cert.pem" "$dir/"
  cp "$KS/enclaves/governance.p7s" "$dir/"
  cat >"$dir/permissions.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xsi:noNamespaceSchemaLocation="$SCHEMA/omg_shared_ca_permissions.xsd">
  <permissions>
    <grant name="$enclave">
      <subject_name>CN=$enclave</subject_name>
      <validity>
        <not_before>$not_before</not_before>
        <not_after>$not_after</not_after>
      </validity>
      <allow_rule>
        $domains
        <publish><topics><topic>*</topic></topics></publish>
        <subscribe><topics><topic>*</topic></topics></subscribe>
      </allow_rule>
      <default>DENY</default>
    </grant>
  </permissions>
</dds>
EOF
  sign "$dir/permissions.xml" "$dir/permissions.p7s"
  echo "enclave $enclave"
done
rm -f "$KS/public/"*.srl
echo "keystore $KS"
