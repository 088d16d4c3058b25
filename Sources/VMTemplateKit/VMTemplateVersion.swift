/// This build of vmtemplate: what `--version` prints and the API's `GET /v1/version` answers.
public enum VMTemplateVersion {
    public static let current = "0.3.0"
    /// The API's version, the first part of every path.
    public static let api = "v1"
}
