#!/bin/sh
# Make a throwaway CA and a wildcard certificate for *.DOMAIN (plus DOMAIN, 127.0.0.1, ::1)
# for demos and tests. Production certificates come from your site's CA or certbot.
#   usage: contrib/dev-ca.sh DIR DOMAIN [IP]  -> DIR/ca.pem DIR/cert.pem DIR/key.pem (IP: one more address in it)
set -eu
dir=$1 domain=$2 extra=${3:+,IP:$3}
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=satellite test CA" -keyout ca-key.pem -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=*.$domain" -keyout key.pem -out cert.csr 2>/dev/null
printf 'subjectAltName=DNS:*.%s,DNS:%s,IP:127.0.0.1,IP:::1%s\nextendedKeyUsage=serverAuth\n' \
    "$domain" "$domain" "$extra" > cert.ext
openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile cert.ext -out cert.pem 2>/dev/null
rm -f cert.csr cert.ext ca.srl
chmod 644 ca.pem cert.pem
