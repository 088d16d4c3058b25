import Foundation
import Testing

@testable import VMTemplateAPI
@testable import VMTemplateDistribution
@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Templates between nodes: a second store stands for another node; a real registry (Debian's
/// docker-registry, the CNCF distribution registry) on loopback; OCI image layouts.
extension RealGuests {
    @Suite("templates between nodes", .serialized)
    struct DistributionIntegrationTests {
        /// docker-registry on a free loopback port, its storage in a directory of the test's.
        final class Registry {
            let root: String
            let port: UInt16
            let process: Process
            /// The token service of a registry with `tokens`.
            var tokenService: Process?
            var host: String { "127.0.0.1:\(port)" }

            /// With `secured`: TLS from a CA the test makes (`ca.pem`) and htpasswd (basic)
            /// authentication for tester:secret (`creds.json`, as docker login writes it).
            /// With `tokens`: the distribution token flow, a token service of the test's on
            /// another port that lets tester:secret pull and push (`creds.json`) and
            /// reader:secret only pull (`reader.json`).
            init(secured: Bool = false, tokens: Bool = false) async throws {
                root = "/tmp/vmt-reg-\(UUID().uuidString.prefix(8))"
                try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
                port = try freeLocalPort()
                var config = """
                    version: 0.1
                    log:
                      level: error
                    storage:
                      filesystem:
                        rootdirectory: \(root)/data
                      delete:
                        enabled: true
                    http:
                      addr: 127.0.0.1:\(port)

                    """
                if secured {
                    try Shell.run("""
                        set -e
                        cd \(root)
                        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=vmt-test-ca 2>/dev/null
                        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
                        printf 'subjectAltName=IP:127.0.0.1\\n' > ext.cnf
                        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null
                        htpasswd -Bbn tester secret > htpasswd
                        printf '{"auths":{"127.0.0.1:\(port)":{"auth":"%s"}}}' "$(printf tester:secret | base64)" > creds.json
                        printf '{"auths":{"127.0.0.1:\(port)":{"auth":"%s"}}}' "$(printf tester:wrong | base64)" > wrong.json
                        """)
                    config += """
                          tls:
                            certificate: \(root)/server.pem
                            key: \(root)/server.key
                        auth:
                          htpasswd:
                            realm: vmt-test
                            path: \(root)/htpasswd
                        """
                }
                if tokens {
                    let tokenPort = try freeLocalPort()
                    try Shell.run("""
                        set -e
                        cd \(root)
                        openssl req -x509 -newkey rsa:2048 -nodes -keyout token.key -out token.pem -days 2 -subj /CN=vmt-test-tokens 2>/dev/null
                        printf '{"auths":{"127.0.0.1:\(port)":{"auth":"%s"}}}' "$(printf tester:secret | base64)" > creds.json
                        printf '{"auths":{"127.0.0.1:\(port)":{"auth":"%s"}}}' "$(printf reader:secret | base64)" > reader.json
                        printf '{"auths":{"127.0.0.1:\(port)":{"auth":"%s"}}}' "$(printf tester:wrong | base64)" > wrong.json
                        """)
                    config += """
                        auth:
                          token:
                            realm: http://127.0.0.1:\(tokenPort)/token
                            service: vmt-registry
                            issuer: vmt-test-tokens
                            rootcertbundle: \(root)/token.pem
                        """
                    let service = Process()
                    service.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
                    service.arguments = ["-c", DistributionIntegrationTests.tokenServer, "\(root)/token.key", "\(root)/token.pem", String(tokenPort), "vmt-test-tokens"]
                    service.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
                    service.standardError = FileHandle(forWritingAtPath: "/dev/null")
                    try service.run()
                    tokenService = service
                }
                try config.write(toFile: "\(root)/config.yml", atomically: true, encoding: .utf8)
                process = Process()
                process.executableURL = URL(fileURLWithPath: "/usr/bin/docker-registry")
                process.arguments = ["serve", "\(root)/config.yml"]
                process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
                process.standardError = FileHandle(forWritingAtPath: "/dev/null")
                try process.run()
                let probe = secured ? "curl -s --max-time 5 --cacert \(root)/ca.pem -o /dev/null -w '%{http_code}' https://127.0.0.1:\(port)/v2/ | grep -q 401"
                    : tokens ? "curl -s --max-time 5 -o /dev/null -w '%{http_code}' http://127.0.0.1:\(port)/v2/ | grep -q 401"
                    : "curl -sf --max-time 5 http://127.0.0.1:\(port)/v2/"
                let up = await eventually(timeout: .seconds(20)) { (try? Shell.run(probe)) != nil }
                try #require(up, "docker-registry did not start")
            }

            /// The registry's own copy of a blob (its filesystem driver's layout).
            func blobData(_ digest: String) -> String {
                let hex = digest.dropFirst(7)
                return "\(root)/data/docker/registry/v2/blobs/sha256/\(hex.prefix(2))/\(hex)/data"
            }

            func stop() {
                // SIGKILL: a test runner may ignore SIGTERM, and Process keeps that for its child.
                for running in [process] + (tokenService.map { [$0] } ?? []) {
                    kill(running.processIdentifier, SIGKILL)
                    running.waitUntilExit()
                }
                try? FileManager.default.removeItem(atPath: root)
            }
        }

        /// The distribution token flow's token service: a JWT (RS256, the signing certificate in
        /// `x5c`, signed by openssl) for the scopes asked for, cut to what the user may do.
        static let tokenServer = #"""
            import base64, http.server, json, subprocess, sys, time, urllib.parse, uuid
            key, cert, port, issuer = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
            rights = {'tester': {'pull', 'push'}, 'reader': {'pull'}}
            def b64(data): return base64.urlsafe_b64encode(data).rstrip(b'=').decode()
            der = subprocess.run(['openssl', 'x509', '-in', cert, '-outform', 'DER'], capture_output=True, check=True).stdout
            class Tokens(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                    user = None
                    for name in rights:
                        if self.headers.get('Authorization') == 'Basic ' + base64.b64encode(name.encode() + b':secret').decode():
                            user = name
                    if user is None:
                        self.send_response(401); self.send_header('Content-Length', '0'); self.end_headers(); return
                    access = []
                    for scope in query.get('scope', []):
                        kind, name, actions = scope.split(':')
                        access.append({'type': kind, 'name': name, 'actions': [a for a in actions.split(',') if a in rights[user]]})
                    now = int(time.time())
                    header = b64(json.dumps({'alg': 'RS256', 'typ': 'JWT', 'x5c': [base64.b64encode(der).decode()]}).encode())
                    claims = b64(json.dumps({'iss': issuer, 'sub': user, 'aud': query.get('service', [''])[0], 'exp': now + 300, 'nbf': now - 10, 'iat': now, 'jti': str(uuid.uuid4()), 'access': access}).encode())
                    signature = subprocess.run(['openssl', 'dgst', '-sha256', '-sign', key], input=(header + '.' + claims).encode(), capture_output=True, check=True).stdout
                    body = json.dumps({'token': header + '.' + claims + '.' + b64(signature), 'expires_in': 300}).encode()
                    self.send_response(200); self.send_header('Content-Type', 'application/json'); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)
                def log_message(self, *args): pass
            http.server.ThreadingHTTPServer(('127.0.0.1', port), Tokens).serve_forever()
            """#

        /// The shared busybox template, its manifest, and what its push to `registry` (as
        /// `vmt/busybox:v1`) did, as `push --json` says it (checked against its schema).
        func pushed(to registry: Registry) async throws -> (source: TemporaryStore, original: TemplateManifest, push: PackResult) {
            let source = try await SharedTemplate.shared.store()
            let pushed = try CLI.run(["push", SharedTemplate.name, "\(registry.host)/vmt/busybox:v1", "--json"] + source.arguments)
            try #require(pushed.status == 0, "\(pushed.stderr)")
            #expect(try JSONSchemas.violations(of: pushed.stdout, against: "push") == nil)
            return (source, try manifest(source, SharedTemplate.name), try JSONCoding.decoder().decode(PackResult.self, from: Data(pushed.stdout.utf8)))
        }

        func manifest(_ store: TemporaryStore, _ name: String) throws -> TemplateManifest {
            try JSONCoding.decoder().decode(TemplateManifest.self, from: Data(contentsOf: URL(fileURLWithPath: "\(store.templateDirectory(name))/manifest.json")))
        }

        /// The pulled template's files are the original's, and a clone of it answers.
        func expectSame(_ pulled: TemporaryStore, _ name: String, as original: TemplateManifest) async throws {
            let copy = try manifest(pulled, name)
            #expect(copy.storedFiles.map(\.sha256) == original.storedFiles.map(\.sha256), "the files' digests equal the originals")
            #expect(copy.machine == original.machine && copy.qemu.version == original.qemu.version)
            let clone = try CLI.run(["clone", name, "--json"] + pulled.arguments)
            try #require(clone.status == 0, "\(clone.stderr)")
            let view = try JSONCoding.decoder().decode(CloneView.self, from: Data(clone.stdout.utf8))
            #expect(try ControlChannel(path: view.controlSocket).request("ping", timeout: .seconds(60)) == "pong", "the pulled template's guest answers")
            #expect(try CLI.run(["rm", "--all"] + pulled.arguments).status == 0)
        }

        @Test("export to an OCI image layout, import on another node, clone: the same files, sparse, and the guest answers")
        func exportImport() async throws {
            let source = try await SharedTemplate.shared.store()
            let original = try manifest(source, SharedTemplate.name)
            let layout = "/tmp/vmt-layout-\(UUID().uuidString.prefix(8))"
            defer { try? FileManager.default.removeItem(atPath: layout) }
            let exported = try CLI.run(["export", SharedTemplate.name, layout, "--json"] + source.arguments)
            try #require(exported.status == 0, "\(exported.stderr)")
            let packed = try JSONCoding.decoder().decode(PackResult.self, from: Data(exported.stdout.utf8))
            #expect(packed.zeroChunks > 0 && packed.compressedBytes < packed.fileBytes / 2, "zero chunks left out, the rest compressed: \(packed)")
            let node = try TemporaryStore("node2")
            defer { node.remove() }
            let imported = try CLI.run(["import", layout, "--json"] + node.arguments)
            try #require(imported.status == 0, "\(imported.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
            let memory = try FileStatus.read(path: "\(node.templateDirectory(SharedTemplate.name))/memory")
            var info = stat()
            stat("\(node.templateDirectory(SharedTemplate.name))/memory", &info)
            #expect(UInt64(info.st_blocks) * 512 < memory.sizeBytes / 2, "the RAM file stays sparse where the guest's memory was zero")
            #expect(try manifest(node, SharedTemplate.name).origin?.digest == packed.digest)
            // list says where it came from too: the digest in FROM, origin in --json.
            let listed = try CLI.run(["list", "--json"] + node.arguments)
            #expect(try JSONSchemas.violations(of: listed.stdout, against: "list") == nil)
            struct Listed: Decodable { var templates: [TemplateView] }
            #expect(try JSONCoding.decoder().decode(Listed.self, from: Data(listed.stdout.utf8)).templates.first?.origin?.digest == packed.digest, "\(listed.stdout)")
            let table = try CLI.run(["list"] + node.arguments)
            #expect(table.stdout.contains("FROM") && table.stdout.contains(String(packed.digest.prefix(19))), "\(table.stdout)")
            // A second import of the same image is the template that is there.
            let again = try CLI.run(["import", layout, "--json"] + node.arguments)
            #expect(again.status == 0 && again.stdout.contains("\"existed\":true"), "\(again.stdout) \(again.stderr)")
        }

        /// Rewrites an archive as a hostile sender could (`mode`): `escape` adds an entry named
        /// `../NAME` and makes one blob a symbolic link to /etc/passwd; `checksum` breaks the
        /// first header's checksum; `truncated` cuts the archive in the middle of a blob.
        static let archiveMangler = #"""
            import io, os, sys, tarfile
            source, target, mode, escape = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
            data = open(source, 'rb').read()
            def block(name, size, kind):
                header = bytearray(512)
                header[0:len(name)] = name.encode()
                for offset, width, value in ((100, 8, 0o644), (108, 8, 0), (116, 8, 0), (124, 12, size), (136, 12, 0)):
                    header[offset:offset + width - 1] = b'%0*o' % (width - 1, value)
                header[156:157] = kind
                header[257:265] = b'ustar\x0000'
                header[148:156] = b' ' * 8
                header[148:155] = b'%06o\0' % sum(header)
                return bytes(header)
            def entry(name, body, kind=b'0'):
                return block(name, len(body), kind) + body + b'\0' * (-len(body) % 512)
            def pax(records):
                body = b''
                for key, value in records:
                    text = b' %s=%s\n' % (key, value)
                    length = len(text) + 1
                    length = len(text) + len(str(length))
                    body += str(length).encode() + text
                return body
            if mode == 'pax':
                # A record whose length leaves no room for a key (it once trapped).
                data = entry('PaxHeader', b'2 xxxxxxxxx', b'x') + data
            elif mode == 'extensions':
                # Two pax headers in a row, the first naming a size the second must not take, then
                # the index: GNU tar and Go read the real index.json; so must import.
                with tarfile.open(fileobj=io.BytesIO(data)) as tin:
                    members = [(m, tin.extractfile(m).read() if m.isfile() else b'') for m in tin.getmembers()]
                body = b''
                real = b''
                for member, content in members:
                    if member.name == 'index.json':
                        real = content
                    elif member.isfile():
                        body += entry(member.name, content)
                junk = b'{"schemaVersion": 2, "manifests": []}'.ljust(1536)
                body += entry('PaxHeader', pax([(b'path', b'index.json'), (b'size', b'1536')]), b'x')
                body += entry('PaxHeader', pax([(b'mtime', b'0')]), b'x')
                body += entry('index.json', real) + entry('junk', junk)
                data = body + b'\0' * 1024
            elif mode == 'checksum':
                data = data[:148] + b'0000000\0' + data[156:]
            elif mode == 'truncated':
                data = data[:len(data) // 2]
            else:
                out = io.BytesIO()
                with tarfile.open(fileobj=io.BytesIO(data)) as tin, tarfile.open(fileobj=out, mode='w', format=tarfile.PAX_FORMAT) as tout:
                    linked = False
                    for member in tin.getmembers():
                        if member.isfile() and member.name.startswith('blobs/sha256/') and not linked and member.size > 4096:
                            link = tarfile.TarInfo(member.name); link.type = tarfile.SYMTYPE; link.linkname = '/etc/passwd'
                            tout.addfile(link); linked = True
                        else:
                            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
                    extra = tarfile.TarInfo('../' + escape); extra.size = 5
                    tout.addfile(extra, io.BytesIO(b'owned'))
                data = out.getvalue()
            open(target, 'wb').write(data)
            """#

        @Test("export to a tar file, import it on another node, clone; the archive is the same byte for byte each time, never replaces a file, and round-trips through skopeo's oci-archive; a damaged or hostile archive is refused in one line, nothing published, nothing written outside the store", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/skopeo"), "needs skopeo (scripts/setup --for-tests)"))
        func exportImportArchive() async throws {
            let source = try await SharedTemplate.shared.store()
            let original = try manifest(source, SharedTemplate.name)
            let directory = "/tmp/vmt-archive-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let archive = "\(directory)/busybox.tar"
            let exported = try CLI.run(["export", SharedTemplate.name, archive, "--json"] + source.arguments)
            try #require(exported.status == 0, "\(exported.stderr)")
            let digest = try JSONCoding.decoder().decode(PackResult.self, from: Data(exported.stdout.utf8)).digest
            var mode = stat()
            #expect(stat(archive, &mode) == 0 && mode.st_mode & 0o777 == 0o600, "the archive holds a guest's memory: 0600")
            let listing = try Shell.run("tar -tf \(archive)")
            #expect(listing.contains("oci-layout") && listing.contains("index.json") && listing.contains("blobs/sha256/"), "\(listing)")
            let digestBefore = try sha256(archive)
            let again = try CLI.run(["export", SharedTemplate.name, archive] + source.arguments)
            #expect(again.status == 73 && again.stderr.contains("exists"), "\(again.stderr)")
            #expect(try sha256(archive) == digestBefore, "an export never replaces a file")
            #expect(try CLI.run(["export", SharedTemplate.name, "\(directory)/second.tar"] + source.arguments).status == 0)
            #expect(try sha256("\(directory)/second.tar") == digestBefore, "the same template makes the same archive")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["busybox.tar", "second.tar"], "no partial file stays")
            // An archive written by skopeo (Go's archive/tar) from ours.
            try Shell.run("skopeo copy oci-archive:\(archive) oci-archive:\(directory)/skopeo.tar >/dev/null")
            let node = try TemporaryStore("node12")
            defer { node.remove() }
            let imported = try CLI.run(["import", "\(directory)/skopeo.tar"] + node.arguments)
            try #require(imported.status == 0, "\(imported.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
            #expect(try CLI.run(["rm-template", SharedTemplate.name] + node.arguments).status == 0)
            // Hostile or damaged archives.
            let escape = "vmt-escape-\(UUID().uuidString.prefix(8))"
            for (mode, expected) in [("escape", "lacks blobs/sha256/"), ("checksum", "is not a tar file"), ("truncated", "truncated"), ("pax", "malformed pax header")] {
                let mangled = "\(directory)/\(mode).tar"
                let made = try Python.run(Self.archiveMangler, arguments: [archive, mangled, mode, escape], input: Data())
                try #require(made.status == 0, "\(made.stderr)")
                let refused = try CLI.run(["import", mangled] + node.arguments)
                #expect(refused.status != 0 && refused.stderr.contains(expected) && refused.stderr.split(separator: "\n").count == 1, "\(mode): \(refused.stderr)")
                #expect(!FileManager.default.fileExists(atPath: node.templateDirectory(SharedTemplate.name)), "\(mode): nothing published")
                #expect(node.stagingEntries().isEmpty, "\(mode): nothing staged")
            }
            // Extension headers read as GNU tar reads them: the archive's real index.
            let extensions = "\(directory)/extensions.tar"
            let made = try Python.run(Self.archiveMangler, arguments: [archive, extensions, "extensions", escape], input: Data())
            try #require(made.status == 0, "\(made.stderr)")
            let gnuIndex = try Shell.run("tar -xOf \(extensions) index.json")
            #expect(gnuIndex.contains(digest), "GNU tar reads the real index.json")
            let read = try CLI.run(["import", extensions, "--json"] + node.arguments)
            try #require(read.status == 0, "\(read.stderr)")
            #expect(try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(read.stdout.utf8)).digest == digest)
            #expect(!FileManager.default.fileExists(atPath: "/tmp/\(escape)") && !FileManager.default.fileExists(atPath: "\(node.root)/pulls/\(escape)") && !FileManager.default.fileExists(atPath: "\(directory)/../\(escape)"), "no entry became a path")
        }

        @Test("push to a registry, pull by digest on another node, clone; a second pull moves nothing; a registry serving a flipped byte, a wrong size or another artifact is refused with nothing published", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func pushPull() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (source, original, push) = try await pushed(to: registry)
            #expect(push.sentBytes > push.compressedBytes && push.sentBytes < push.compressedBytes + 65536, "every chunk and the config sent once: \(push)")
            let again = try CLI.run(["push", SharedTemplate.name, "\(registry.host)/vmt/busybox:v1", "--json"] + source.arguments)
            let second = try JSONCoding.decoder().decode(PackResult.self, from: Data(again.stdout.utf8))
            #expect(second.digest == push.digest && second.sentBytes == 0, "the same template: the same digest, nothing sent again")

            let node = try TemporaryStore("node3")
            defer { node.remove() }
            let reference = "\(registry.host)/vmt/busybox@\(push.digest)"
            let pulled = try CLI.run(["pull", reference, "--json"] + node.arguments)
            try #require(pulled.status == 0, "\(pulled.stderr)")
            #expect(try JSONSchemas.violations(of: pulled.stdout, against: "pull") == nil)
            try await expectSame(node, SharedTemplate.name, as: original)
            let repeated = try CLI.run(["pull", reference, "--json"] + node.arguments)
            #expect(repeated.status == 0 && repeated.stdout.contains("\"existed\":true") && repeated.stdout.contains("\"fetched_chunks\":0"), "\(repeated.stdout)")

            // A flipped byte in one chunk, as the registry serves it: refused, nothing published.
            let image = try JSONDecoder().decode(OCIImageManifest.self, from: Data(contentsOf: URL(fileURLWithPath: registry.blobData(push.digest))))
            let victim = registry.blobData(image.layers[image.layers.count / 2].digest)
            var bytes = try Data(contentsOf: URL(fileURLWithPath: victim))
            bytes[bytes.count / 2] ^= 0x01
            try bytes.write(to: URL(fileURLWithPath: victim))
            let fresh = try TemporaryStore("node4")
            defer { fresh.remove() }
            let flipped = try CLI.run(["pull", reference] + fresh.arguments)
            #expect(flipped.status == 65 && flipped.stderr.contains("does not hash to its digest"), "\(flipped.stderr)")
            #expect(!FileManager.default.fileExists(atPath: fresh.templateDirectory(SharedTemplate.name)), "nothing published")
            #expect(fresh.stagingEntries().isEmpty, "no staging left")
            // Cut short: a wrong size.
            try bytes.prefix(bytes.count - 10).write(to: URL(fileURLWithPath: victim))
            let short = try CLI.run(["pull", reference] + fresh.arguments)
            #expect(short.status == 65 && short.stderr.contains("ended after"), "\(short.stderr)")
            #expect(!FileManager.default.fileExists(atPath: fresh.templateDirectory(SharedTemplate.name)))

            // A manifest of another artifact type under a tag: refused before any blob.
            let other = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.example.other","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#
            _ = try Shell.run("printf '{}' | curl -sf -X POST 'http://\(registry.host)/v2/vmt/other/blobs/uploads/' -D - -o /dev/null | tr -d '\\r' | awk '/^Location:/{print $2}' > \(registry.root)/loc && curl -sf -X PUT -H 'Content-Type: application/octet-stream' \"$(cat \(registry.root)/loc)&digest=sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\" --data-binary '{}' -o /dev/null && curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary '\(other)' http://\(registry.host)/v2/vmt/other/manifests/v1 -o /dev/null")
            let wrongType = try CLI.run(["pull", "\(registry.host)/vmt/other:v1"] + fresh.arguments)
            #expect(wrongType.status == 64 && wrongType.stderr.contains("not a vmtemplate template"), "\(wrongType.stderr)")
            // Nothing there: a clear 404; no registry: a clear line.
            let missing = try CLI.run(["pull", "\(registry.host)/vmt/nothing:v1"] + fresh.arguments)
            #expect(missing.status == 66 && missing.stderr.contains("(404)"), "\(missing.stderr)")
            let down = try CLI.run(["pull", "127.0.0.1:\(try freeLocalPort())/vmt/busybox:v1"] + fresh.arguments)
            #expect(down.status == 74 && down.stderr.contains("cannot be reached"), "\(down.stderr)")
        }

        @Test("TLS from a CA of the test's and basic authentication: pushed and pulled with --ca-file and --creds-file; an untrusted certificate, no credentials and wrong ones each get one line", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func securedRegistry() async throws {
            let source = try await SharedTemplate.shared.store()
            let original = try manifest(source, SharedTemplate.name)
            let registry = try await Registry(secured: true)
            defer { registry.stop() }
            let target = "\(registry.host)/vmt/busybox:v1"
            let untrusted = try CLI.run(["push", SharedTemplate.name, target] + source.arguments)
            #expect(untrusted.status == 77 && untrusted.stderr.contains("not signed by a CA this node trusts"), "\(untrusted.stderr)")
            let anonymous = try CLI.run(["push", SharedTemplate.name, target, "--ca-file", "\(registry.root)/ca.pem"] + source.arguments)
            #expect(anonymous.status == 77 && anonymous.stderr.contains("none is known for it"), "\(anonymous.stderr)")
            let wrong = try CLI.run(["push", SharedTemplate.name, target, "--ca-file", "\(registry.root)/ca.pem", "--creds-file", "\(registry.root)/wrong.json"] + source.arguments)
            #expect(wrong.status == 77 && wrong.stderr.contains("refused the credentials") && !wrong.stderr.contains("wrong"), "\(wrong.stderr)")
            let pushed = try CLI.run(["push", SharedTemplate.name, target, "--ca-file", "\(registry.root)/ca.pem", "--creds-file", "\(registry.root)/creds.json"] + source.arguments)
            try #require(pushed.status == 0, "\(pushed.stderr)")
            let digest = pushed.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let node = try TemporaryStore("node5")
            defer { node.remove() }
            // The credentials where container tools keep them ($REGISTRY_AUTH_FILE).
            let pulled = try CLI.run(["pull", "\(registry.host)/vmt/busybox@\(digest)", "--ca-file", "\(registry.root)/ca.pem"] + node.arguments, environment: ["REGISTRY_AUTH_FILE": "\(registry.root)/creds.json"])
            try #require(pulled.status == 0, "\(pulled.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
        }

        @Test("the distribution token flow: pushed and pulled with a Bearer token from the registry's token service; no credentials, wrong ones, and a reader's for a push each get one line", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func tokenRegistry() async throws {
            let source = try await SharedTemplate.shared.store()
            let original = try manifest(source, SharedTemplate.name)
            let registry = try await Registry(tokens: true)
            defer { registry.stop() }
            let target = "\(registry.host)/vmt/busybox:v1"
            let anonymous = try CLI.run(["push", SharedTemplate.name, target] + source.arguments)
            #expect(anonymous.status == 77 && anonymous.stderr.contains("token service") && anonymous.stderr.contains("an anonymous request"), "\(anonymous.stderr)")
            let wrong = try CLI.run(["push", SharedTemplate.name, target, "--creds-file", "\(registry.root)/wrong.json"] + source.arguments)
            #expect(wrong.status == 77 && wrong.stderr.contains("refused the credentials") && !wrong.stderr.contains("wrong"), "\(wrong.stderr)")
            let reader = try CLI.run(["push", SharedTemplate.name, target, "--creds-file", "\(registry.root)/reader.json"] + source.arguments)
            #expect(reader.status == 77 && reader.stderr.contains("do not allow pushing to vmt/busybox"), "\(reader.stderr)")
            let pushed = try CLI.run(["push", SharedTemplate.name, target, "--creds-file", "\(registry.root)/creds.json"] + source.arguments)
            try #require(pushed.status == 0, "\(pushed.stderr)")
            let digest = pushed.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let node = try TemporaryStore("node11")
            defer { node.remove() }
            // A reader may pull; its credentials where container tools keep them.
            let pulled = try CLI.run(["pull", "\(registry.host)/vmt/busybox@\(digest)"] + node.arguments, environment: ["REGISTRY_AUTH_FILE": "\(registry.root)/reader.json"])
            try #require(pulled.status == 0, "\(pulled.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
        }

        /// A registry's answers that a real one gives only under policy or load: every request
        /// but `/v2/` gets STATUS (with `Retry-After: 30` for 429). A protocol stub.
        static let refusingRegistry = #"""
            import http.server, sys
            port, status = int(sys.argv[1]), int(sys.argv[2])
            class Refusing(http.server.BaseHTTPRequestHandler):
                def answer(self):
                    code = 200 if self.path == '/v2/' else status
                    self.send_response(code)
                    if code == 429: self.send_header('Retry-After', '30')
                    self.send_header('Content-Length', '0'); self.end_headers()
                do_GET = do_HEAD = do_POST = do_PUT = answer
                def log_message(self, *args): pass
            http.server.ThreadingHTTPServer(('127.0.0.1', port), Refusing).serve_forever()
            """#

        @Test("a registry that forbids (403) or rate-limits (429): one line each, with what to do and the Retry-After, for pull and push; nothing published")
        func refusingRegistry() async throws {
            let source = try await SharedTemplate.shared.store()
            let node = try TemporaryStore("node13")
            defer { node.remove() }
            for (status, exit, expected) in [(403, Int32(77), "forbids pulling from vmt/busybox (403)"), (429, Int32(69), "rate-limiting requests (429) (Retry-After: 30 s)")] {
                let port = try freeLocalPort()
                let stub = Process()
                stub.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
                stub.arguments = ["-c", Self.refusingRegistry, String(port), String(status)]
                try stub.run()
                defer { kill(stub.processIdentifier, SIGKILL); stub.waitUntilExit() }
                #expect(await eventually(timeout: .seconds(10)) { (try? Shell.run("curl -sf --max-time 5 http://127.0.0.1:\(port)/v2/")) != nil })
                let pull = try CLI.run(["pull", "127.0.0.1:\(port)/vmt/busybox:v1"] + node.arguments)
                #expect(pull.status == exit && pull.stderr.contains(expected) && pull.stderr.split(separator: "\n").count == 1, "\(pull.stderr)")
                #expect(!FileManager.default.fileExists(atPath: node.templateDirectory("busybox")) && node.stagingEntries().isEmpty, "nothing published or staged")
                let push = try CLI.run(["push", SharedTemplate.name, "127.0.0.1:\(port)/vmt/busybox:v1"] + source.arguments)
                #expect(push.status == exit && push.stderr.contains(status == 403 ? "forbids pushing to vmt/busybox (403)" : expected), "\(push.stderr)")
            }
        }

        @Test("an independent OCI client (skopeo) copies what push pushed, byte for byte, and pushes an exported template that vmtemplate pulls and clones", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/skopeo"), "needs skopeo (scripts/setup --for-tests)"))
        func skopeoInteroperates() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (source, original, push) = try await pushed(to: registry)
            let digest = push.digest
            let copied = "\(registry.root)/skopeo-layout"
            try Shell.run("skopeo copy --src-tls-verify=false docker://\(registry.host)/vmt/busybox@\(digest) oci:\(copied):busybox >/dev/null")
            let index = try JSONDecoder().decode(OCIIndex.self, from: Data(contentsOf: URL(fileURLWithPath: "\(copied)/index.json")))
            #expect(index.manifests.first?.digest == digest, "skopeo kept the manifest byte for byte")
            let image = try JSONDecoder().decode(OCIImageManifest.self, from: Data(contentsOf: URL(fileURLWithPath: "\(copied)/blobs/sha256/\(digest.dropFirst(7))")))
            for blob in image.layers + [image.config] {
                #expect(try sha256("\(copied)/blobs/sha256/\(blob.digest.dropFirst(7))") == String(blob.digest.dropFirst(7)), "every blob skopeo fetched hashes to its digest")
            }
            // The other way: skopeo pushes an exported template; vmtemplate pulls and clones it.
            let layout = "\(registry.root)/exported"
            #expect(try CLI.run(["export", SharedTemplate.name, layout] + source.arguments).status == 0)
            try Shell.run("skopeo copy --dest-tls-verify=false oci:\(layout):\(SharedTemplate.name) docker://\(registry.host)/vmt/by-skopeo:v1 >/dev/null")
            let node = try TemporaryStore("node6")
            defer { node.remove() }
            let pulled = try CLI.run(["pull", "\(registry.host)/vmt/by-skopeo:v1"] + node.arguments)
            try #require(pulled.status == 0, "\(pulled.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
        }

        /// Forwards to the registry, but after `passing` blob downloads holds every further one
        /// (its client then hangs), so a pull can be killed at a known point.
        static let stallingProxy = #"""
            import http.server, sys, time, urllib.request
            upstream, port, passing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
            served = [0]
            class Proxy(http.server.BaseHTTPRequestHandler):
                def forward(self, body):
                    if '/blobs/sha256:' in self.path and self.command == 'GET':
                        served[0] += 1
                        if served[0] > passing + 1:
                            time.sleep(3600)
                    request = urllib.request.Request(upstream + self.path, method=self.command, headers={k: v for k, v in self.headers.items() if k.lower() != 'host'})
                    try:
                        answer = urllib.request.urlopen(request)
                    except urllib.error.HTTPError as error:
                        answer = error
                    data = answer.read()
                    self.send_response(answer.status if hasattr(answer, 'status') else answer.code)
                    for key, value in answer.headers.items():
                        if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
                            self.send_header(key, value)
                    self.send_header('Content-Length', str(len(data)))
                    self.end_headers()
                    if self.command != 'HEAD':
                        self.wfile.write(data)
                def do_GET(self): self.forward(None)
                def do_HEAD(self): self.forward(None)
                def log_message(self, *args): pass
            http.server.ThreadingHTTPServer(('127.0.0.1', port), Proxy).serve_forever()
            """#

        @Test("a pull killed at several points publishes nothing and leaves only verified chunks; the next pull fetches only the chunks it lacks", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func killedPullsResume() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (_, original, push) = try await pushed(to: registry)
            let node = try TemporaryStore("node7")
            defer { node.remove() }
            let blobs = "\(node.root)/pulls/blobs"
            func verifiedBlobs() -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: blobs)) ?? []).filter { !$0.hasSuffix(".partial") } }
            // Killed after 1 chunk, then after 2 more (the config is a download too, not a chunk).
            var kept = 0
            for passing in [1, 2] where kept + passing < push.layers {
                kept += passing
                let port = try freeLocalPort()
                let proxy = Process()
                proxy.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
                proxy.arguments = ["-c", Self.stallingProxy, "http://\(registry.host)", String(port), String(passing)]
                try proxy.run()
                // SIGKILL: a test runner may ignore SIGTERM, and Process keeps that for its child.
                defer { kill(proxy.processIdentifier, SIGKILL); proxy.waitUntilExit() }
                #expect(await eventually(timeout: .seconds(10)) { (try? Shell.run("curl -sf http://127.0.0.1:\(port)/v2/")) != nil })
                let pull = try CLI.start(["pull", "127.0.0.1:\(port)/vmt/busybox@\(push.digest)"] + node.arguments)
                #expect(await eventually(timeout: .seconds(60)) { verifiedBlobs().count >= kept }, "the pull fetched \(passing) more chunks")
                try await Task.sleep(for: .milliseconds(300))
                kill(pull.process.processIdentifier, SIGKILL)
                pull.process.waitUntilExit()
                #expect(!FileManager.default.fileExists(atPath: node.templateDirectory(SharedTemplate.name)), "nothing published")
                #expect(node.stagingEntries().isEmpty, "nothing staged")
                #expect(verifiedBlobs().count == kept, "only the verified chunks stay: \(verifiedBlobs())")
            }
            let resumed = try CLI.run(["pull", "\(registry.host)/vmt/busybox@\(push.digest)", "--json"] + node.arguments)
            try #require(resumed.status == 0, "\(resumed.stderr)")
            let result = try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(resumed.stdout.utf8))
            #expect(result.reusedChunks == kept && result.fetchedChunks == push.layers - kept, "\(result)")
            try await expectSame(node, SharedTemplate.name, as: original)
            #expect(verifiedBlobs().isEmpty, "a published template's chunks are not kept")
            // What an abandoned pull left: gc removes it once no pull has used it for an hour.
            try Shell.run("printf stale > \(blobs)/\(String(repeating: "a", count: 64)) && touch -d '2 hours ago' \(blobs)/\(String(repeating: "a", count: 64)) && printf fresh > \(blobs)/\(String(repeating: "b", count: 64))")
            let collected = try CLI.run(["gc"] + node.arguments)
            #expect(collected.status == 0, "\(collected.stderr)")
            #expect(verifiedBlobs() == [String(repeating: "b", count: 64)], "the stale chunk went, the fresh one stays: \(verifiedBlobs())")
        }

        @Test("pulls SIGKILLed at random moments (downloading, rebuilding, publishing): each left nothing published or a whole template that verifies; gc clears what a killed pull staged; the next pull completes", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func pullsKilledAtRandom() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (_, original, push) = try await pushed(to: registry)
            let digest = push.digest
            let reference = "\(registry.host)/vmt/busybox@\(digest)"
            // How long a whole pull takes here, to kill inside it.
            let timing = try TemporaryStore("node15t")
            let began = ContinuousClock.now
            #expect(try CLI.run(["pull", reference] + timing.arguments).status == 0)
            let whole = ContinuousClock.now - began
            timing.remove()
            let node = try TemporaryStore("node15")
            defer { node.remove() }
            var outcomes: [String] = []
            for trial in 0..<5 {
                let moment = whole * Double.random(in: 0.05...1.0)
                let pull = try CLI.start(["pull", reference] + node.arguments)
                try await Task.sleep(for: moment)
                kill(pull.process.processIdentifier, SIGKILL)
                pull.process.waitUntilExit()
                if FileManager.default.fileExists(atPath: node.templateDirectory(SharedTemplate.name)) {
                    // Killed after the rename: the template is whole.
                    let verified = try CLI.run(["verify", SharedTemplate.name] + node.arguments)
                    #expect(verified.status == 0, "trial \(trial): a published template verifies: \(verified.stderr)")
                    #expect(try CLI.run(["rm-template", SharedTemplate.name] + node.arguments).status == 0)
                    outcomes.append("published")
                } else {
                    outcomes.append("nothing")
                }
                let blobs = (try? FileManager.default.contentsOfDirectory(atPath: "\(node.root)/pulls/blobs")) ?? []
                let layer = try JSONDecoder().decode(OCIImageManifest.self, from: Data(contentsOf: URL(fileURLWithPath: registry.blobData(digest)))).layers.map { String($0.digest.dropFirst(7)) }
                #expect(blobs.allSatisfy { $0.hasSuffix(".partial") || layer.contains($0) }, "trial \(trial): only this template's chunks: \(blobs)")
                let collected = try CLI.run(["gc"] + node.arguments)
                #expect(collected.status == 0, "\(collected.stderr)")
                #expect(node.stagingEntries().isEmpty, "trial \(trial): gc removed what the killed pull staged")
            }
            let last = try CLI.run(["pull", reference, "--json"] + node.arguments)
            try #require(last.status == 0, "\(outcomes): \(last.stderr)")
            try await expectSame(node, SharedTemplate.name, as: original)
        }

        /// Forwards to the registry, holding each blob download a moment so that downloads a
        /// client makes at once overlap here; `GET /most` says how many were in flight at most.
        static let countingProxy = #"""
            import http.server, sys, threading, time, urllib.request
            upstream, port = sys.argv[1], int(sys.argv[2])
            lock, state = threading.Lock(), {'now': 0, 'most': 0}
            class Proxy(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    if self.path == '/most':
                        body = str(state['most']).encode()
                        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body); return
                    blob = '/blobs/sha256:' in self.path
                    if blob:
                        with lock:
                            state['now'] += 1; state['most'] = max(state['most'], state['now'])
                        time.sleep(0.5)
                    try:
                        answer = urllib.request.urlopen(urllib.request.Request(upstream + self.path, headers={k: v for k, v in self.headers.items() if k.lower() != 'host'}))
                    except urllib.error.HTTPError as error:
                        answer = error
                    data = answer.read()
                    if blob:
                        with lock: state['now'] -= 1
                    self.send_response(answer.status if hasattr(answer, 'status') else answer.code)
                    for key, value in answer.headers.items():
                        if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
                            self.send_header(key, value)
                    self.send_header('Content-Length', str(len(data))); self.end_headers(); self.wfile.write(data)
                def log_message(self, *args): pass
            http.server.ThreadingHTTPServer(('127.0.0.1', port), Proxy).serve_forever()
            """#

        @Test("a pull fetches several chunks at once (at most 4), and the template it publishes is whole", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func parallelFetches() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (_, original, push) = try await pushed(to: registry)
            let digest = push.digest
            let port = try freeLocalPort()
            let proxy = Process()
            proxy.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            proxy.arguments = ["-c", Self.countingProxy, "http://\(registry.host)", String(port)]
            try proxy.run()
            defer { kill(proxy.processIdentifier, SIGKILL); proxy.waitUntilExit() }
            #expect(await eventually(timeout: .seconds(10)) { (try? Shell.run("curl -sf --max-time 5 http://127.0.0.1:\(port)/v2/")) != nil })
            let node = try TemporaryStore("node16")
            defer { node.remove() }
            let pulled = try CLI.run(["pull", "127.0.0.1:\(port)/vmt/busybox@\(digest)", "--json"] + node.arguments)
            try #require(pulled.status == 0, "\(pulled.stderr)")
            let chunks = try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(pulled.stdout.utf8)).fetchedChunks
            let most = Int(try Shell.run("curl -sf --max-time 5 http://127.0.0.1:\(port)/most")) ?? 0
            #expect(chunks >= 4 && most >= 2 && most <= TemplateReceiver.parallelFetches, "\(chunks) chunks, at most \(most) in flight")
            try await expectSame(node, SharedTemplate.name, as: original)
        }

        @Test("POST /v1/templates/pull pulls by digest and publishes (201), a second one is the template there (200), and a clone of it answers; a member of the socket's group may not pull", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func pullThroughAPI() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (_, original, push) = try await pushed(to: registry)
            let digest = push.digest
            let node = try TemporaryStore("node8")
            defer { node.remove() }
            let server = try CLI.start(["serve", "--socket-group", "nogroup"] + node.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
            }
            let client = UnixHTTPClient(socketPath: "\(node.root)/serve.sock")
            #expect(await eventually(timeout: .seconds(30)) { (try? client.request("GET", "/v1/version"))?.status == 200 })
            let body = Data(#"{"reference": "\#(registry.host)/vmt/busybox@\#(digest)", "name": "remote"}"#.utf8)
            let first = try client.request("POST", "/v1/templates/pull", body: body)
            #expect(first.status == 201, "\(String(decoding: first.body, as: UTF8.self))")
            #expect(try JSONSchemas.violations(of: String(decoding: first.body, as: UTF8.self), against: "pull") == nil)
            let second = try client.request("POST", "/v1/templates/pull", body: body)
            #expect(second.status == 200 && String(decoding: second.body, as: UTF8.self).contains("\"existed\" : true"), "\(String(decoding: second.body, as: UTF8.self))")
            let events = String(decoding: try client.request("GET", "/v1/events?since=0").body, as: UTF8.self)
            #expect(events.contains("\"template.added\"") && events.contains("remote"), "\(events)")
            let member = try ShortCommand.run("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", Checkout.binary, "api", "POST", "/v1/templates/pull", String(decoding: body, as: UTF8.self), "--socket", "\(node.root)/serve.sock"])
            #expect(member.status == 77 && member.stdout.contains("only the store's owner or root may pull"), "\(member.stdout)")
            let copy = try manifest(node, "remote")
            #expect(copy.storedFiles.map(\.sha256) == original.storedFiles.map(\.sha256))
            let clone = try CLI.run(["clone", "remote", "--json"] + node.arguments)
            try #require(clone.status == 0, "\(clone.stderr)")
            let view = try JSONCoding.decoder().decode(CloneView.self, from: Data(clone.stdout.utf8))
            #expect(try ControlChannel(path: view.controlSocket).request("ping", timeout: .seconds(60)) == "pong")
            #expect(try CLI.run(["rm", "--all"] + node.arguments).status == 0)
        }

        /// Rewrites the config of the image in an OCI layout (`edit` changes its JSON), then the
        /// manifest and index.json so that every digest holds again: an artifact any OCI tool
        /// could have made.
        static let configEditor = #"""
            import hashlib, json, os, sys
            layout, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
            def blob(digest): return os.path.join(layout, 'blobs', 'sha256', digest.split(':')[1])
            def put(data):
                digest = 'sha256:' + hashlib.sha256(data).hexdigest()
                open(blob(digest), 'wb').write(data)
                return digest, len(data)
            index = json.load(open(os.path.join(layout, 'index.json')))
            manifest = json.load(open(blob(index['manifests'][0]['digest'])))
            config = json.load(open(blob(manifest['config']['digest'])))
            target = config
            *path, last = key.split('.')
            for part in path: target = target[part]
            target[last] = value
            manifest['config']['digest'], manifest['config']['size'] = put(json.dumps(config).encode())
            index['manifests'][0]['digest'], index['manifests'][0]['size'] = put(json.dumps(manifest).encode())
            open(os.path.join(layout, 'index.json'), 'w').write(json.dumps(index))
            """#

        @Test("a template made with another QEMU version, or for another machine type, is refused in one line before any chunk moves, nothing published")
        func otherQEMURefused() async throws {
            let source = try await SharedTemplate.shared.store()
            let layout = "/tmp/vmt-layout-\(UUID().uuidString.prefix(8))"
            defer { try? FileManager.default.removeItem(atPath: layout) }
            #expect(try CLI.run(["export", SharedTemplate.name, layout] + source.arguments).status == 0)
            let node = try TemporaryStore("node9")
            defer { node.remove() }
            for (key, value, expected) in [("qemu.version", #""9.2.0""#, "made with QEMU 9.2.0"),
                                           ("machine.machine_type", #""pc-q35-2.99""#, "machine type pc-q35-2.99")] {
                let copy = "\(layout)-\(key)"
                defer { try? FileManager.default.removeItem(atPath: copy) }
                try Shell.run("cp -r \(layout) \(copy)")
                let edited = try Python.run(Self.configEditor, arguments: [copy, key, value], input: Data())
                try #require(edited.status == 0, "\(edited.stderr)")
                let refused = try CLI.run(["import", copy] + node.arguments)
                #expect(refused.status == 78 && refused.stderr.contains(expected), "\(refused.stderr)")
                #expect(!FileManager.default.fileExists(atPath: node.templateDirectory(SharedTemplate.name)), "nothing published")
                #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(node.root)/pulls/blobs")) ?? []).isEmpty, "no chunk moved")
            }
        }

        @Test("a second version of a template takes the chunks it shares with one this node pulled before from that template, hashed first: a damaged one is fetched instead")
        func versionsShareChunks() async throws {
            let source = try await SharedTemplate.shared.store()
            let original = try manifest(source, SharedTemplate.name)
            let layout = "/tmp/vmt-versions-\(UUID().uuidString.prefix(8))"
            defer { for suffix in ["", "-v2", "-v3"] { try? FileManager.default.removeItem(atPath: layout + suffix) } }
            let exported = try CLI.run(["export", SharedTemplate.name, layout, "--json"] + source.arguments)
            try #require(exported.status == 0, "\(exported.stderr)")
            let packed = try JSONCoding.decoder().decode(PackResult.self, from: Data(exported.stdout.utf8))
            // Two more versions: another config (so another digest), the same chunks.
            for version in ["v2", "v3"] {
                try Shell.run("cp -r \(layout) \(layout)-\(version)")
                let edited = try Python.run(Self.configEditor, arguments: ["\(layout)-\(version)", "name", #""busybox-\#(version)""#], input: Data())
                try #require(edited.status == 0, "\(edited.stderr)")
            }
            let node = try TemporaryStore("node14")
            defer { node.remove() }
            let first = try CLI.run(["import", layout, "--json"] + node.arguments)
            try #require(first.status == 0, "\(first.stderr)")
            #expect(try JSONSchemas.violations(of: first.stdout, against: "pull") == nil)
            #expect(try manifest(node, SharedTemplate.name).origin?.chunks?.count == packed.layers, "the chunks it arrived in are recorded")
            // One chunk of the first version damaged on this node: hashed, not believed, fetched.
            let damaged = try #require(try manifest(node, SharedTemplate.name).origin?.chunks?.first)
            try Shell.run("printf 'X' | dd of=\(node.templateDirectory(SharedTemplate.name))/\(damaged.file) bs=1 seek=\(damaged.offset + 4096) conv=notrunc status=none")
            let second = try CLI.run(["import", "\(layout)-v2", "--json"] + node.arguments)
            try #require(second.status == 0, "\(second.stderr)")
            let v2 = try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(second.stdout.utf8))
            #expect(v2.template == "busybox-v2" && v2.localChunks == packed.layers - 1 && v2.fetchedChunks == 1, "\(v2)")
            let third = try CLI.run(["import", "\(layout)-v3", "--json"] + node.arguments)
            try #require(third.status == 0, "\(third.stderr)")
            let v3 = try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(third.stdout.utf8))
            #expect(v3.localChunks == packed.layers && v3.fetchedChunks == 0 && v3.fetchedBytes == 0, "every chunk from the intact versions here: \(v3)")
            for version in ["busybox-v2", "busybox-v3"] {
                try await expectSame(node, version, as: original)
            }
        }

        @Test("a store without room for a template is refused before any chunk moves, in one line; nothing published", .enabled(if: Environment.isRoot, "needs root to mount a small tmpfs"))
        func noRoom() async throws {
            let source = try await SharedTemplate.shared.store()
            let layout = "/tmp/vmt-noroom-\(UUID().uuidString.prefix(8))"
            defer { try? FileManager.default.removeItem(atPath: layout) }
            #expect(try CLI.run(["export", SharedTemplate.name, layout] + source.arguments).status == 0)
            let tmpfs = try TmpfsStore("small", size: "64M")
            defer { tmpfs.unmount() }
            let small = tmpfs.store
            let refused = try CLI.run(["import", layout] + small.arguments)
            #expect(refused.status == 74 && refused.stderr.contains("not enough disk space") && refused.stderr.split(separator: "\n").count == 1, "\(refused.stderr)")
            #expect(!FileManager.default.fileExists(atPath: small.templateDirectory(SharedTemplate.name)) && small.stagingEntries().isEmpty, "nothing published or staged")
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(small.root)/pulls/blobs")) ?? []).isEmpty, "no chunk moved")
        }

        @Test("two pulls of one digest at once: both succeed, the chunks are downloaded once", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/docker-registry"), "needs docker-registry (scripts/setup --for-tests)"))
        func concurrentPulls() async throws {
            let registry = try await Registry()
            defer { registry.stop() }
            let (_, original, push) = try await pushed(to: registry)
            let digest = push.digest
            let node = try TemporaryStore("node10")
            defer { node.remove() }
            let reference = "\(registry.host)/vmt/busybox@\(digest)"
            let pulls = try (0..<2).map { _ in try CLI.start(["pull", reference, "--json"] + node.arguments) }
            var fetched = 0
            var existed = 0
            var layers = 0
            for pull in pulls {
                pull.process.waitUntilExit()
                let result = pull.result()
                try #require(result.status == 0, "\(result.stderr)")
                let answer = try JSONCoding.decoder().decode(ReceiveResult.self, from: Data(result.stdout.utf8))
                fetched += answer.fetchedChunks
                layers = max(layers, answer.fetchedChunks + answer.reusedChunks)
                existed += answer.existed ? 1 : 0
            }
            #expect(existed == 1 && fetched == layers, "one pull fetched every chunk once, the other found the template: fetched \(fetched), existed \(existed)")
            try await expectSame(node, SharedTemplate.name, as: original)
        }
    }
}
