import AsyncHTTPClient
import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization
import VMTemplateKit
import VMTemplateOS

/// `host[:port]/repository[:tag][@sha256:…]`, as container tools write image references (the
/// host is always given: there is no default registry).
public struct ImageReference: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var repository: String
    public var tag: String?
    public var digest: String?

    public init(parsing text: String) throws {
        func refuse(_ why: String) -> VMTemplateError {
            VMTemplateError(.invalidArgument, "'\(TerminalText.escape(String(text.prefix(200))))' is not an image reference (\(why)): write HOST[:PORT]/REPOSITORY[:TAG] or HOST[:PORT]/REPOSITORY@sha256:DIGEST, e.g. 127.0.0.1:5000/templates/busybox@sha256:….")
        }
        guard text.utf8.count <= 512, !text.contains(where: { $0.isWhitespace || $0.isNewline }) else { throw refuse("too long, or spaces") }
        var rest = Substring(text)
        var digest: String?
        if let at = rest.firstIndex(of: "@") {
            digest = String(rest[rest.index(after: at)...])
            rest = rest[..<at]
            guard let digest, Digest.isSHA256(digest) else { throw refuse("a digest is sha256: and 64 lowercase hex digits") }
        }
        guard let slash = rest.firstIndex(of: "/") else { throw refuse("no registry host") }
        let host = String(rest[..<slash])
        var path = rest[rest.index(after: slash)...]
        var tag: String?
        if let colon = path.lastIndex(of: ":") {
            tag = String(path[path.index(after: colon)...])
            path = path[..<colon]
        }
        guard Self.isHost(host) else { throw refuse("'\(TerminalText.escape(host))' is no host[:port]") }
        guard Self.isRepository(String(path)) else { throw refuse("the repository is lowercase letters, digits and . _ - separated by /") }
        if let tag {
            guard tag.utf8.count <= 128, let first = tag.utf8.first, first != 0x2e && first != 0x2d,
                  tag.utf8.allSatisfy({ Self.isAlnum($0) || $0 == 0x5f || $0 == 0x2e || $0 == 0x2d }) else { throw refuse("a tag is letters, digits, _ . -, at most 128") }
        }
        guard tag != nil || digest != nil else { throw refuse("name a tag or, better, a digest") }
        self.host = host
        repository = String(path)
        self.tag = tag
        self.digest = digest
    }

    /// The tag or digest a manifest is fetched by (the digest when both are given).
    public var manifestReference: String { digest ?? tag ?? "" }

    public var description: String { "\(host)/\(repository)\(tag.map { ":\($0)" } ?? "")\(digest.map { "@\($0)" } ?? "")" }

    /// On this machine (localhost, 127.0.0.0/8, [::1]): plain HTTP is allowed there without asking.
    public var isLoopback: Bool {
        let name = host.hasPrefix("[") ? String(host.prefix { $0 != "]" }) + "]" : String(host.prefix { $0 != ":" })
        return name == "localhost" || name == "[::1]" || name.hasPrefix("127.")
    }

    static func isAlnum(_ byte: UInt8) -> Bool { (0x30...0x39).contains(byte) || (0x41...0x5a).contains(byte) || (0x61...0x7a).contains(byte) }

    static func isHost(_ host: String) -> Bool {
        guard (1...255).contains(host.utf8.count) else { return false }
        return host.utf8.allSatisfy { isAlnum($0) || $0 == 0x2e || $0 == 0x2d || $0 == 0x3a || $0 == 0x5b || $0 == 0x5d }
    }

    static func isRepository(_ path: String) -> Bool {
        guard (1...255).contains(path.utf8.count) else { return false }
        return path.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { component in
            guard let first = component.utf8.first, let last = component.utf8.last, !component.isEmpty else { return false }
            let lower: (UInt8) -> Bool = { (0x30...0x39).contains($0) || (0x61...0x7a).contains($0) }
            return lower(first) && lower(last) && component.utf8.allSatisfy { lower($0) || $0 == 0x2e || $0 == 0x5f || $0 == 0x2d }
        }
    }
}

/// How to reach a registry: TLS (the system's CAs, or `--ca-file`), or plain HTTP when asked or
/// on loopback; credentials from the files container tools keep.
public struct RegistryOptions: Sendable {
    public var plainHTTP = false
    public var caFile: String?
    /// A `config.json`/`auth.json` to read credentials from, instead of the usual places.
    public var credentialsFile: String?
    public var timeout: Duration = .seconds(60)

    public init() {}
}

/// A registry, spoken to as the OCI distribution spec says, through AsyncHTTPClient: manifests
/// and blobs by digest, monolithic blob uploads, and the authentication a registry asks for
/// (`Basic`, or a `Bearer` token from its token service, the distribution token flow).
/// Credentials are never put in a message, a log line or a record.
final class RegistryClient: BlobTarget, BlobOrigin, Sendable {
    let reference: ImageReference
    let options: RegistryOptions
    let http: HTTPClient
    let credentials: RegistryCredentials?
    /// `https`, or `http` when asked (`--plain-http`), or for a loopback registry whose TLS
    /// handshake failed (a registry on this machine without TLS, as docker treats localhost).
    private let scheme: Mutex<String>
    private let mayFallBackToPlain: Bool
    private let token = Mutex<String?>(nil)
    let push: Bool

    var label: String { "registry \(reference.host)" }

    init(_ reference: ImageReference, options: RegistryOptions, push: Bool) throws {
        self.reference = reference
        self.options = options
        self.push = push
        scheme = Mutex(options.plainHTTP ? "http" : "https")
        mayFallBackToPlain = !options.plainHTTP && options.caFile == nil && reference.isLoopback
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .follow(max: 5, allowCycles: false)
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(60))
        if let caFile = options.caFile {
            var tls = TLSConfiguration.makeClientConfiguration()
            do {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            } catch {
                throw VMTemplateError(.invalidArgument, "--ca-file '\(TerminalText.escape(caFile))' holds no PEM certificate: give the CA that signed the registry's certificate.")
            }
            configuration.tlsConfiguration = tls
        }
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        credentials = try RegistryCredentials.find(for: reference.host, file: options.credentialsFile)
    }

    var base: String { "\(scheme.withLock { $0 })://\(reference.host)/v2/\(reference.repository)" }

    /// For a loopback registry reached without `--plain-http` or `--ca-file`: plain HTTP unless
    /// it answers that it speaks HTTPS (a TLS handshake with a plain server fails only once the
    /// client's connect timeout has passed).
    func chooseScheme() async {
        guard mayFallBackToPlain else { return }
        var request = HTTPClientRequest(url: "http://\(reference.host)/v2/")
        request.method = .GET
        guard let response = try? await http.execute(request, timeout: .seconds(5)) else { return }
        let body = (try? await response.body.collect(upTo: 4096)).map { String(buffer: $0) } ?? ""
        if !(response.status == .badRequest && body.contains("HTTPS")) {
            scheme.withLock { $0 = "http" }
        }
    }

    func shutdown() async {
        try? await http.shutdown()
    }

    // MARK: BlobTarget

    func hasBlob(_ descriptor: OCIDescriptor) async throws -> Bool {
        let response = try await send(.HEAD, "\(base)/blobs/\(descriptor.digest)", what: "blob \(descriptor.digest)", accepting: [200, 404])
        return response.status == .ok
    }

    func putBlob(_ bytes: [UInt8], descriptor: OCIDescriptor) async throws {
        let started = try await send(.POST, "\(base)/blobs/uploads/", what: "an upload", accepting: [202])
        guard let location = started.headers.first(name: "Location"), !location.isEmpty, location.utf8.count <= 4096 else {
            throw VMTemplateError(.ioError, "\(label) started an upload without saying where to send it (no Location): it is not an OCI registry.")
        }
        let url = try absolute(location)
        let separator = url.contains("?") ? "&" : "?"
        _ = try await send(.PUT, "\(url)\(separator)digest=\(descriptor.digest)", what: "blob \(descriptor.digest)", body: bytes, contentType: "application/octet-stream", accepting: [201])
    }

    func putManifest(_ bytes: [UInt8], digest: String, tag: String?) async throws {
        _ = try await send(.PUT, "\(base)/manifests/\(tag ?? digest)", what: "the manifest", body: bytes, contentType: TemplateArtifact.manifestMediaType, accepting: [201])
    }

    // MARK: BlobOrigin

    func manifest(_ reference: String) async throws -> (bytes: [UInt8], digest: String) {
        let response = try await send(.GET, "\(base)/manifests/\(reference)", what: "\(self.reference)", accept: TemplateArtifact.manifestMediaType, accepting: [200])
        let bytes = try await collect(response, limit: TemplateArtifact.maxManifestBytes, what: "the manifest")
        let digest = Digest.hex(SHA256.hash(data: bytes))
        if Digest.isSHA256(reference), digest != reference {
            throw VMTemplateError(.integrityFailure, "\(label) answered \(reference) with a manifest that hashes to \(digest): refused, nothing was published.")
        }
        return (bytes, digest)
    }

    func smallBlob(_ descriptor: OCIDescriptor, limit: Int) async throws -> [UInt8] {
        guard descriptor.size >= 0, descriptor.size <= Int64(limit) else {
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) is \(descriptor.size) bytes, more than the \(limit) accepted.")
        }
        let response = try await send(.GET, "\(base)/blobs/\(descriptor.digest)", what: "blob \(descriptor.digest)", accepting: [200])
        let bytes = try await collect(response, limit: Int(descriptor.size), what: "blob \(descriptor.digest)")
        try BlobCheck.verify(bytes, against: descriptor, from: label)
        return bytes
    }

    func fetchBlob(_ descriptor: OCIDescriptor, to path: String) async throws {
        let response = try await send(.GET, "\(base)/blobs/\(descriptor.digest)", what: "blob \(descriptor.digest)", accepting: [200])
        // Bounded by what the manifest says (a chunk is at most ~32 MiB): a longer body is refused
        // as it arrives, before it is all in memory.
        let bytes = try await collect(response, limit: Int(descriptor.size), what: "blob \(descriptor.digest)")
        let origin = label
        try await onOwnThread {
            let writer = try VerifyingWriter(path: path, descriptor: descriptor, origin: origin)
            try bytes.withUnsafeBytes { try writer.write($0) }
            try writer.finish()
        }
    }

    // MARK: HTTP

    private func collect(_ response: HTTPClientResponse, limit: Int, what: String) async throws -> [UInt8] {
        var bytes: [UInt8] = []
        for try await buffer in response.body {
            guard bytes.count + buffer.readableBytes <= limit else {
                throw VMTemplateError(.integrityFailure, "\(label) sent more than the \(limit) bytes \(what) has: refused, nothing was published.")
            }
            bytes += buffer.readableBytesView
        }
        return bytes
    }

    private func absolute(_ location: String) throws -> String {
        if location.hasPrefix("http://") || location.hasPrefix("https://") { return location }
        guard location.hasPrefix("/") else { throw VMTemplateError(.ioError, "\(label) gave an upload location that is no URL.") }
        let scheme = base.hasPrefix("https") ? "https" : "http"
        return "\(scheme)://\(reference.host)\(location)"
    }

    /// One request, with the authentication the registry asks for (at most one challenge
    /// answered), mapped to one clear error for every status it does not accept.
    private func send(_ method: HTTPMethod, _ url: String, what: String, body: [UInt8]? = nil, contentType: String? = nil, accept: String? = nil, accepting: Set<UInt>) async throws -> HTTPClientResponse {
        var challenged = false
        var url = url
        while true {
            var request = HTTPClientRequest(url: url)
            request.method = method
            if let accept { request.headers.add(name: "Accept", value: accept) }
            if let contentType { request.headers.add(name: "Content-Type", value: contentType) }
            if let body {
                request.body = .bytes(ByteBuffer(bytes: body))
                request.headers.add(name: "Content-Length", value: String(body.count))
            }
            if let token = token.withLock({ $0 }) { request.headers.add(name: "Authorization", value: token) }
            let response: HTTPClientResponse
            do {
                response = try await http.execute(request, timeout: .seconds(Int64(options.timeout.components.seconds)))
            } catch let error as NIOSSLError {
                // Only a server that does not speak TLS at all; one whose certificate is not
                // trusted is said so.
                if mayFallBackToPlain, url.hasPrefix("https://"), !"\(error)".contains("CERTIFICATE_VERIFY_FAILED") {
                    scheme.withLock { $0 = "http" }
                    url = "http://" + url.dropFirst("https://".count)
                    continue
                }
                if "\(error)".contains("CERTIFICATE_VERIFY_FAILED") {
                    throw VMTemplateError(.permissionDenied, "\(label)'s TLS certificate is not signed by a CA this node trusts: pass --ca-file with the CA that signed it.")
                }
                throw VMTemplateError(.permissionDenied, "\(label): TLS failed (\(Self.describe(error))): pass --ca-file with the CA that signed its certificate, or --plain-http for a registry without TLS.")
            } catch let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout {
                throw VMTemplateError(.timeout, "\(label) did not answer in time (\(what)): check that it runs and is reachable, then try again.")
            } catch {
                throw VMTemplateError(.ioError, "\(label) cannot be reached (\(Self.describe(error))): check the host and port, that it runs, and --plain-http for one without TLS.")
            }
            if response.status.code == 401, !challenged, let challenge = response.headers.first(name: "WWW-Authenticate") {
                challenged = true
                try await authenticate(challenge)
                continue
            }
            if accepting.contains(response.status.code) { return response }
            switch response.status.code {
            case 401:
                // A token that holds fewer rights than the request needs, from credentials the
                // token service accepted: the distribution spec's `insufficient_scope`.
                if credentials != nil, let challenge = response.headers.first(name: "WWW-Authenticate"),
                   Self.parseChallenge(challenge).1["error"] == "insufficient_scope" {
                    throw VMTemplateError(.permissionDenied, "\(label): the credentials found for it do not allow \(push ? "pushing to" : "pulling from") \(reference.repository) (401, insufficient scope): use credentials with that right.")
                }
                throw VMTemplateError(.permissionDenied, "\(label) refused \(credentials == nil ? "an anonymous request" : "the credentials found for it") (401) for \(what): log in (docker login, podman login) or pass --creds-file.")
            case 403:
                throw VMTemplateError(.permissionDenied, "\(label) forbids \(push ? "pushing to" : "pulling from") \(reference.repository) (403) for these credentials: use credentials with that right, or ask the registry's owner for it.")
            case 404:
                throw VMTemplateError(.notFound, "\(label) has no \(what) in \(reference.repository) (404): check the reference.")
            case 429:
                let after = response.headers.first(name: "Retry-After").map { " (Retry-After: \(TerminalText.escape(String($0.prefix(20)))) s)" } ?? ""
                throw VMTemplateError(.limitExceeded, "\(label) is rate-limiting requests (429)\(after): try again later.")
            default:
                throw VMTemplateError(.ioError, "\(label) answered \(response.status.code) for \(what): try again, or check the registry's log.")
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge: `Basic` with the credentials found, or `Bearer`
    /// by asking the token service it names (with the credentials, if any) for a token of this
    /// repository's scope.
    private func authenticate(_ challenge: String) async throws {
        let (scheme, parameters) = Self.parseChallenge(challenge)
        switch scheme.lowercased() {
        case "basic":
            guard let credentials else {
                throw VMTemplateError(.permissionDenied, "\(label) asks for a user name and password, and none is known for it: log in (docker login, podman login) or pass --creds-file.")
            }
            token.withLock { $0 = "Basic \(credentials.basic)" }
        case "bearer":
            guard let realm = parameters["realm"], realm.hasPrefix("https://") || realm.hasPrefix("http://") else {
                throw VMTemplateError(.ioError, "\(label) asks for a token without saying where to get one (no realm).")
            }
            var query: [String] = []
            if let service = parameters["service"] { query.append("service=\(Self.percentEncoded(service))") }
            let scope = parameters["scope"] ?? "repository:\(reference.repository):\(push ? "pull,push" : "pull")"
            query.append("scope=\(Self.percentEncoded(scope))")
            var request = HTTPClientRequest(url: "\(realm)\(realm.contains("?") ? "&" : "?")\(query.joined(separator: "&"))")
            if let credentials { request.headers.add(name: "Authorization", value: "Basic \(credentials.basic)") }
            let response: HTTPClientResponse
            do {
                response = try await http.execute(request, timeout: .seconds(30))
            } catch {
                throw VMTemplateError(.ioError, "the token service of \(label) cannot be reached (\(Self.describe(error))).")
            }
            guard response.status == .ok else {
                throw VMTemplateError(.permissionDenied, "the token service of \(label) refused \(credentials == nil ? "an anonymous request" : "the credentials found for it") (\(response.status.code)): log in (docker login, podman login) or pass --creds-file.")
            }
            let body = try await collect(response, limit: 64 * 1024, what: "a token")
            struct TokenAnswer: Decodable {
                var token: String?
                var accessToken: String?
                enum CodingKeys: String, CodingKey {
                    case token
                    case accessToken = "access_token"
                }
            }
            guard let answer = try? JSONDecoder().decode(TokenAnswer.self, from: Data(body)), let value = answer.token ?? answer.accessToken,
                  !value.isEmpty, value.utf8.count <= 16 * 1024, !value.contains(where: { $0.isNewline || $0 == "\r" }) else {
                throw VMTemplateError(.ioError, "the token service of \(label) answered without a token.")
            }
            token.withLock { $0 = "Bearer \(value)" }
        default:
            throw VMTemplateError(.unsupported, "\(label) asks for '\(TerminalText.escape(String(scheme.prefix(20))))' authentication; vmtemplate speaks Basic and Bearer.")
        }
    }

    /// `Bearer realm="…",service="…",scope="…"` → ("Bearer", [realm: …, …]).
    static func parseChallenge(_ text: String) -> (String, [String: String]) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard let space = trimmed.firstIndex(of: " ") else { return (trimmed, [:]) }
        var parameters: [String: String] = [:]
        var rest = trimmed[trimmed.index(after: space)...]
        while let equals = rest.firstIndex(of: "=") {
            let key = rest[..<equals].trimmingCharacters(in: CharacterSet(charactersIn: " ,")).lowercased()
            var value = ""
            var after = rest.index(after: equals)
            if after < rest.endIndex, rest[after] == "\"" {
                let start = rest.index(after: after)
                let end = rest[start...].firstIndex(of: "\"") ?? rest.endIndex
                value = String(rest[start..<end])
                after = end < rest.endIndex ? rest.index(after: end) : end
            } else {
                let end = rest[after...].firstIndex(of: ",") ?? rest.endIndex
                value = String(rest[after..<end])
                after = end
            }
            parameters[key] = value
            rest = rest[after...]
        }
        return (String(trimmed[..<space]), parameters)
    }

    static func percentEncoded(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: CharacterSet.alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
    }

    /// An error's own words, on one line, never a request (whose headers may hold credentials).
    static func describe(_ error: any Error) -> String {
        TerminalText.escape(String(("\(error)".split(whereSeparator: \.isNewline).first ?? "").prefix(200)))
    }
}

/// A user name and password for one registry, from the files container tools keep:
/// `--creds-file`, else `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `~/.docker/config.json` (`{"auths": {"HOST": {"auth": base64("user:password")}}}`).
struct RegistryCredentials: Sendable {
    /// base64 of `user:password`, as `Authorization: Basic` takes it.
    let basic: String

    static func find(for host: String, file explicit: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> RegistryCredentials? {
        var files: [String] = []
        if let explicit {
            files = [explicit]
        } else {
            if let file = environment["REGISTRY_AUTH_FILE"], !file.isEmpty { files.append(file) }
            if let runtime = environment["XDG_RUNTIME_DIR"], !runtime.isEmpty { files.append("\(runtime)/containers/auth.json") }
            if let home = environment["HOME"], !home.isEmpty { files.append("\(home)/.docker/config.json") }
        }
        struct AuthFile: Decodable {
            struct Entry: Decodable { var auth: String? }
            var auths: [String: Entry]?
        }
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else {
                if explicit != nil { throw VMTemplateError(.notFound, "--creds-file '\(TerminalText.escape(file))' cannot be read: give a config.json or auth.json (docker login, podman login write one).") }
                continue
            }
            guard data.count <= 1 << 20, let parsed = try? JSONDecoder().decode(AuthFile.self, from: data) else {
                // Its contents are secrets: not quoted.
                throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(file))' is not a container tools' credentials file ({\"auths\": {...}}).")
            }
            for (key, entry) in parsed.auths ?? [:] {
                let name = key.replacingOccurrences(of: "https://", with: "").replacingOccurrences(of: "http://", with: "").split(separator: "/").first.map(String.init) ?? key
                guard name == host, let auth = entry.auth, let decoded = Data(base64Encoded: auth), decoded.contains(0x3a) else { continue }
                return RegistryCredentials(basic: auth)
            }
        }
        return nil
    }
}
